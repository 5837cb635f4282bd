"""SeLa-v2: Sinkhorn labels over the whole bank spread the images evenly, the chunked scores change
nothing, the loss trains the model's prototypes, the configs, a resumed run, one process vs two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_deepcluster import FakeModel, batch_embeddings
from test_kmeans import _join_gloo, run_two_processes, sphere
from test_promises import TINY_TRUNK, train_two_processes

import swav.losses.sela_v2 as sela_module
from swav import checkpoint
from swav.build import build_model, build_step_context, place_model
from swav.config import ConfigError, load_config
from swav.losses import EpochContext, SeLaV2Loss, StepOutputs, sinkhorn, sinkhorn_labels
from swav.train import train, train_step

RECIPE = "config=pretrain/sela_v2/sela_v2_cifar10_resnet18"
TINY = [
    RECIPE,
    *TINY_TRUNK,
    "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
    "config.DATA.TRAIN.DATA_PATHS=[train]",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=32",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
    "config.OPTIMIZER.num_epochs=2",
    'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [32, 64, 16], "use_bn": true, "num_clusters": [6, 4]}]]',
]


def tiny(run_dir: Path, *extra: str):
    return load_config([*TINY, f"config.CHECKPOINT.DIR={run_dir}", *extra])


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def skewed_bank(n: int = 600, k: int = 6, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prototypes and a bank leaning towards the first one (its argmax takes most rows)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(k, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(n, d, generator=g) + 1.5 * prototypes[0], dim=1)
    return bank, prototypes


def with_prototypes(model: FakeModel, prototypes: list[torch.Tensor]) -> EpochContext:
    return EpochContext(embed=model.embed, prototypes=lambda: prototypes)


def small_loss(**kwargs) -> SeLaV2Loss:
    args = dict(num_crops=3, num_clusters=(4, 3), crops_for_mb=(0, 2), embedding_dim=5, temperature=0.1)
    return SeLaV2Loss(**{**args, **kwargs})


# ------------------------------------------------------------------------------ the assignment


def test_sinkhorn_labels_give_near_equal_clusters_where_the_argmax_does_not():
    bank, prototypes = skewed_bank()
    argmax = torch.bincount((bank @ prototypes.t()).argmax(dim=1), minlength=6)
    assert argmax.max() > 5 * argmax.min()  # the plain argmax piles the images on one prototype
    three = torch.bincount(sinkhorn_labels(bank, prototypes, 0.05, 3), minlength=6)
    assert three.max() < 1.6 * three.min()  # SwAV's 3 iterations: far more even
    many = torch.bincount(sinkhorn_labels(bank, prototypes, 0.05, 30), minlength=6)
    assert ((many - 100).abs() <= 5).all(), many  # the equal partition, 600 / 6
    assert three.sum() == many.sum() == 600


def test_the_labels_are_the_argmax_of_sinkhorn_and_chunking_changes_nothing(monkeypatch):
    bank, prototypes = sphere(257, 8, seed=1), sphere(9, 8, seed=2)
    labels = sinkhorn_labels(bank, prototypes, 0.05, 3)
    assert torch.equal(labels, sinkhorn(bank @ prototypes.t(), 0.05, 3).argmax(dim=1))
    monkeypatch.setattr(sela_module, "_ROWS_PER_PRODUCT", 10)
    assert torch.equal(sinkhorn_labels(bank, prototypes, 0.05, 3), labels)


def test_the_assignment_uses_each_heads_normalised_prototypes_on_its_crops_bank():
    loss_fn = small_loss()
    model = FakeModel(16, 5, num_bank_crops=2)
    prototypes = [sphere(4, 5, seed=3), sphere(3, 5, seed=4)]
    # Off the sphere, as the last optimizer step left them: the assignment normalises them.
    loss_fn.start_epoch(0, with_prototypes(model, [3.0 * prototypes[0], 0.5 * prototypes[1]]))
    assert model.calls == [(0, 2)]
    for h in (0, 1):
        expected = sinkhorn_labels(model.embeddings[h], prototypes[h], 0.05, 3)
        assert torch.equal(loss_fn.targets(model.indices)[h], expected)
    with pytest.raises(ValueError, match="the model's prototypes are"):
        small_loss().start_epoch(0, with_prototypes(model, prototypes[:1]))


def test_the_loss_is_the_cross_entropy_of_the_models_scores():
    loss_fn = small_loss()
    model = FakeModel(16, 5, num_bank_crops=2)
    prototypes = [sphere(4, 5, seed=3), sphere(3, 5, seed=4)]
    loss_fn.start_epoch(0, with_prototypes(model, prototypes))
    z = batch_embeddings(3, 4, 5)
    scores = [z @ p.t() for p in prototypes]
    batch = model.indices[8:12]
    loss = loss_fn.step(StepOutputs(embeddings=z, scores=scores, prototypes=prototypes, indices=batch), 2)
    expected = 0.0
    for s, t in zip(scores, loss_fn.targets(batch), strict=True):
        log_p = F.log_softmax(s.detach().double() / 0.1, dim=1)
        rows = t.repeat(3)
        expected += -log_p[torch.arange(12), rows].mean().item() / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(loss_fn.bank[:, 8:12], z.detach().view(3, 4, 5)[[0, 2]])


def test_the_prototypes_are_learned(tmp_path):
    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    model = place_model(cfg, build_model(cfg), torch.device("cpu"))
    ctx = build_step_context(cfg, model, torch.device("cpu"))
    fake = FakeModel(16, 16, num_bank_crops=2, first_index=0)
    ctx.objective.start_epoch(0, with_prototypes(fake, [w.detach() for w in model.prototype_weights()]))
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    train_step(ctx, crops, 0, lr=0.5, indices=fake.indices[:8])
    before = [w.detach().clone() for w in model.prototype_weights()]
    train_step(ctx, crops, 1, lr=0.5, indices=fake.indices[8:])
    for old, new in zip(before, model.prototype_weights(), strict=True):
        assert not torch.allclose(old, F.normalize(new.detach(), dim=1), atol=1e-4)


# ------------------------------------------------------------------------------ configs and runs


def test_the_8node_config_is_the_papers():
    cfg = load_config(["config=pretrain/sela_v2/sela_v2_8node_resnet"])
    loss = cfg.LOSS.sela_v2_loss
    assert cfg.LOSS.name == "sela_v2_loss" and cfg.OPTIMIZER.num_epochs == 400
    assert (list(loss.num_clusters), loss.num_crops, list(cfg.DATA.TRAIN.TRANSFORMS[0].size_crops)) == (
        [3000, 3000, 3000], 6, [160, 96])
    assert (loss.epsilon, loss.num_iters, loss.temperature) == (0.05, 3, 0.1)
    with torch.device("meta"):
        model = build_model(cfg)
    assert [w.shape for w in model.prototype_weights()] == [(3000, 128)] * 3
    with pytest.raises(ConfigError, match="has no prototypes, which sela_v2_loss learns"):
        load_config([RECIPE, 'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 128], "num_clusters": []}]]'])


def test_the_cpu_recipe_trains_two_iterations_at_32_px_on_synthetic_data(tmp_path):
    cfg = load_config([RECIPE, "config.DATA.TRAIN.DATA_SOURCES=[synthetic]", "config.DATA.TRAIN.DATA_PATHS=[train]",
                       "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=64", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
                       "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DATA.NUM_DATALOADER_WORKERS=0",
                       "config.MODEL.AMP_PARAMS.USE_AMP=false", "config.KNN_MONITOR.ENABLED=false",
                       "config.LOG_FREQUENCY=1", f"config.CHECKPOINT.DIR={tmp_path}"])
    assert list(cfg.LOSS.sela_v2_loss.num_clusters) == [500, 500, 500]
    assert train(cfg, stop_after_iters=2)["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))
    assert checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["loss"]["labels"].shape == (3, 64)


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny(whole))
    assert train(tiny(parts), stop_after_iters=5)["stopped"]  # inside epoch 1, labels from the bank
    train(tiny(parts))
    assert losses(parts) == losses(whole)
    a, b = (checkpoint.load(run / checkpoint.CHECKPOINT_NAME) for run in (whole, parts))
    for part in ("model", "loss"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), f"{part} {key}"


def _assignment_worker(rank: int, port: int, model: FakeModel, prototypes: list, out_dir: str) -> None:
    _join_gloo(rank, port)
    try:
        mine = slice(0, 32) if rank == 0 else slice(32, None)  # every rank trains on as many images
        part = FakeModel(1, 5, 2)
        part.indices, part.embeddings = model.indices[mine], model.embeddings[:, mine]
        loss_fn = small_loss()
        loss_fn.start_epoch(0, with_prototypes(part, prototypes))
        torch.save(loss_fn.table, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_processes_label_like_one_process_with_both_banks(tmp_path):
    model = FakeModel(64, 5, num_bank_crops=2, seed=5)
    prototypes = [sphere(4, 5, seed=6), sphere(3, 5, seed=7)]
    run_two_processes(_assignment_worker, (model, prototypes, str(tmp_path)))
    one = small_loss()
    one.start_epoch(0, with_prototypes(model, prototypes))
    # The sums run in another order over two processes: only near-ties of the codes may flip.
    clear = []
    for h, p in enumerate(prototypes):
        top = sinkhorn(model.embeddings[h] @ p.t(), 0.05, 3).topk(2, dim=1).values
        clear.append(top[:, 0] - top[:, 1] > 1e-4)
    clear = torch.stack(clear)
    assert clear.float().mean() > 0.9
    for rank in (0, 1):
        table = torch.load(tmp_path / f"rank{rank}.pt")
        assert table.shape == one.table.shape and torch.equal(table < 0, one.table < 0)
        assert torch.equal(table[:, model.indices][clear], one.table[:, model.indices][clear])
    # The equal partition is over all images: one rank's half alone would be labelled otherwise.
    half = small_loss()
    part = FakeModel(1, 5, 2)
    part.indices, part.embeddings = model.indices[:32], model.embeddings[:, :32]
    half.start_epoch(0, with_prototypes(part, prototypes))
    assert not torch.equal(half.targets(model.indices[:32]), one.targets(model.indices[:32]))


def _unequal_rows_worker(rank: int, port: int, out_dir: str) -> None:
    _join_gloo(rank, port)
    try:
        bank = sphere(5 if rank == 0 else 3, 4, seed=rank)
        try:
            sinkhorn_labels(bank, sphere(2, 4, seed=9))
            message = "no error"
        except ValueError as e:
            message = str(e)
        Path(out_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_sinkhorn_labels_refuse_ranks_with_unequal_banks(tmp_path):
    # Sinkhorn's equal partition takes the total as rows x ranks: unequal banks would give wrong
    # column sums silently, so every rank must refuse, and say how many rows each holds.
    run_two_processes(_unequal_rows_worker, (str(tmp_path),))
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "the ranks hold [5, 3] bank rows: Sinkhorn over all of them needs as many on each")


def test_a_run_of_one_process_resumes_in_two_with_their_banks_filled_again(tmp_path):
    # The other way round: each of the two ranks fills a bank of its own images, and the
    # Sinkhorn labels span both (every image of the dataset gets one).
    run = tmp_path / "run"
    args = [*TINY, "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=64", f"config.CHECKPOINT.DIR={run}"]
    assert train(load_config([*args, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]), stop_after_iters=10)["stopped"]
    train_two_processes([*args, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"])
    log = (run / "log.txt").read_text()
    assert "written by 1 processes and this run has 2" in log
    state = checkpoint.load(run / checkpoint.CHECKPOINT_NAME)
    assert state["world_size"] == 2 and state["iteration"] == 8  # epoch 1 went on at image 16 (8 per rank)
    banks = [rank_state["bank_indices"] for rank_state in state["loss_per_rank"]]
    assert sorted(torch.cat(banks).tolist()) == list(range(64))
    assert all(v == v and abs(v) < 1e6 for v in losses(run))


def test_the_memory_bank_pass_augments_in_the_step_as_the_loader_does(tmp_path):
    # With GPU_AUGMENT the bank's first filling (a pass over the data) augments on the device too.
    train(tiny(tmp_path / "loader"))
    train(tiny(tmp_path / "step", "config.DATA.TRAIN.GPU_AUGMENT=true"))
    assert losses(tmp_path / "step") == losses(tmp_path / "loader")

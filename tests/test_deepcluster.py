"""DeepCluster-v2: the loss against hand-computed numbers, the memory bank (filled once, written by
the steps, saved and restored), centroids no optimizer can move, unassigned images, the configs,
a resumed run that ends bit-identical to an uninterrupted one, and one process vs two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_kmeans import _join_gloo, run_two_processes
from test_promises import TINY_TRUNK, train_two_processes

from swav import checkpoint
from swav.build import build_model, build_step_context, place_model
from swav.config import ConfigError, load_config
from swav.data import ResumableSampler
from swav.losses import DeepClusterV2Loss, EpochContext, StepOutputs, spherical_kmeans
from swav.train import train, train_step

RECIPE = "config=pretrain/deepcluster_v2/deepclusterv2_cifar10_resnet18"
# The CPU recipe cut to test_promises.py's tiny run: 32 synthetic images, batch 8 (4 iterations per
# epoch), 2 epochs, the small RegNet, 2 crops of 32 px, two heads of 6 and 4 clusters, both crops
# in the memory bank.
TINY = [
    RECIPE,
    *TINY_TRUNK,
    "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
    "config.DATA.TRAIN.DATA_PATHS=[train]",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=32",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
    "config.OPTIMIZER.num_epochs=2",
    'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [32, 64, 16], "use_bn": true, "num_clusters": []}]]',
    "config.LOSS.deepclusterv2_loss.num_clusters=[6, 4]",
]


def tiny(run_dir: Path, *extra: str):
    return load_config([*TINY, f"config.CHECKPOINT.DIR={run_dir}", *extra])


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class FakeModel:
    """An EpochContext over fixed embeddings: `n` images with dataset indices `indices`."""

    def __init__(self, n: int, dim: int, num_bank_crops: int, seed: int = 0, first_index: int = 100) -> None:
        g = torch.Generator().manual_seed(seed)
        self.indices = first_index + torch.randperm(n, generator=g)
        self.embeddings = F.normalize(torch.randn(num_bank_crops, n, dim, generator=g), dim=2)
        self.calls: list[tuple[int, ...]] = []

    def embed(self, crops) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(tuple(crops))
        return self.indices.clone(), self.embeddings[: len(crops)].clone()

    def context(self) -> EpochContext:
        return EpochContext(embed=self.embed, prototypes=lambda: [])


def small_loss(**kwargs) -> DeepClusterV2Loss:
    args = dict(num_crops=3, num_clusters=(4, 3), crops_for_mb=(0, 2), embedding_dim=5, temperature=0.1, kmeans_iters=5)
    return DeepClusterV2Loss(**{**args, **kwargs})


def batch_embeddings(num_crops: int, batch: int, dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_crops * batch, dim, generator=g), dim=1).requires_grad_()


def reference_loss(z: torch.Tensor, centroids: list[torch.Tensor], targets: list[torch.Tensor], temperature: float,
                   num_crops: int) -> float:
    """Float64: per head the mean over every crop of -log softmax(z.c / T)[label], then the mean over heads."""
    total = 0.0
    for c, t in zip(centroids, targets, strict=True):
        log_p = F.log_softmax(z.detach().double() @ c.double().t() / temperature, dim=1)
        rows = t.repeat(num_crops)
        total += -log_p[torch.arange(len(rows)), rows].mean().item()
    return total / len(centroids)


# ------------------------------------------------------------------------------ the loss


def test_the_assignment_is_kmeans_per_head_on_its_crops_bank_and_the_loss_is_the_cross_entropy():
    loss_fn = small_loss()
    model = FakeModel(16, 5, num_bank_crops=2)
    loss_fn.start_epoch(0, model.context())
    assert model.calls == [(0, 2)]
    # Head 0 clusters the bank of crop 0, head 1 the bank of crop 2 (the heads alternate).
    for h, k in enumerate((4, 3)):
        centroids, labels = spherical_kmeans(model.embeddings[h], k, 5, seed=loss_fn.kmeans_seed(0, h))
        assert torch.equal(loss_fn.centroids()[h], centroids)
        assert torch.equal(loss_fn.targets(model.indices)[h], labels)

    batch = model.indices[4:8]  # iteration 1 of 4 per epoch: the bank's rows 4..7
    z = batch_embeddings(3, 4, 5)
    loss = loss_fn.step(StepOutputs(embeddings=z, scores=[], prototypes=[], indices=batch), iteration=1)
    targets = loss_fn.targets(batch)
    expected = reference_loss(z, loss_fn.centroids(), list(targets), 0.1, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # The step wrote its bank crops (0 and 2) at its rows, detached; the other rows are untouched.
    crops = z.detach().view(3, 4, 5)
    assert torch.equal(loss_fn.bank[:, 4:8], crops[[0, 2]])
    assert torch.equal(loss_fn.bank_indices[4:8], batch)
    assert torch.equal(loss_fn.bank[:, :4], model.embeddings[:, :4])
    assert not loss_fn.bank.requires_grad


def test_unassigned_images_are_ignored_and_a_batch_without_any_gives_zero():
    loss_fn = small_loss()
    model = FakeModel(16, 5, num_bank_crops=2)
    loss_fn.start_epoch(0, model.context())
    known, unknown = model.indices[:2], torch.tensor([5, 10_000])  # not in any bank
    z = batch_embeddings(3, 4, 5, seed=2)
    scores = [z @ c.t() for c in loss_fn.centroids()]
    mixed = loss_fn.classification_loss(scores, torch.cat([known, unknown]))
    labelled_rows = torch.tensor([r for crop in range(3) for r in (crop * 4, crop * 4 + 1)])
    alone = reference_loss(z[labelled_rows], loss_fn.centroids(), list(loss_fn.targets(known)), 0.1, 3)
    assert mixed.item() == pytest.approx(alone, rel=1e-6)

    z = batch_embeddings(3, 2, 5, seed=3)
    loss = loss_fn.step(StepOutputs(embeddings=z, scores=[], prototypes=[], indices=unknown), iteration=0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all() and not z.grad.any()


def test_the_bank_is_filled_once_then_the_epochs_use_it():
    loss_fn = small_loss()
    model = FakeModel(16, 5, num_bank_crops=2)
    with pytest.raises(RuntimeError, match="has no memory bank yet"):
        loss_fn.start_epoch(0)
    loss_fn.start_epoch(0, model.context())
    before = [c.clone() for c in loss_fn.centroids()]
    for iteration in range(4):  # one epoch of batches of 4 overwrites every row
        rows = model.indices[iteration * 4 : (iteration + 1) * 4]
        z = batch_embeddings(3, 4, 5, seed=10 + iteration)
        loss_fn.step(StepOutputs(embeddings=z, scores=[], prototypes=[], indices=rows), iteration)
    loss_fn.start_epoch(1, model.context())
    assert model.calls == [(0, 2)]  # no second pass: the epoch's own embeddings are the bank
    assert int(loss_fn.labelled_epoch) == 1
    assert not torch.equal(before[0], loss_fn.centroids()[0])
    centroids, _ = spherical_kmeans(loss_fn.bank[0], 4, 5, seed=loss_fn.kmeans_seed(1, 0))
    assert torch.equal(loss_fn.centroids()[0], centroids)


def test_a_saved_state_restores_into_a_fresh_loss_without_a_pass():
    loss_fn = small_loss()
    model = FakeModel(16, 5, num_bank_crops=2)
    loss_fn.start_epoch(0, model.context())
    z = batch_embeddings(3, 4, 5)
    loss_fn.step(StepOutputs(embeddings=z, scores=[], prototypes=[], indices=model.indices[:4]), 0)
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    assert "table" not in state  # the same on every rank: rebuilt, not saved

    fresh = small_loss()
    assert fresh.bank.shape == (2, 0, 5)
    fresh.load_state_dict(state)  # strict: the empty buffers take the saved sizes
    assert fresh.bank.shape == (2, 16, 5)
    again = FakeModel(16, 5, num_bank_crops=2)
    fresh.start_epoch(0, again.context())  # the epoch the state was saved in: its labels stay
    assert again.calls == []
    assert torch.equal(fresh.targets(model.indices), loss_fn.targets(model.indices))
    z2 = batch_embeddings(3, 4, 5, seed=4)
    out = [f.step(StepOutputs(embeddings=z2, scores=[], prototypes=[], indices=model.indices[4:8]), 1)
           for f in (loss_fn, fresh)]
    assert torch.equal(out[0], out[1])
    # A batch size that does not tile the bank is refused rather than written to the wrong rows.
    z3 = batch_embeddings(3, 3, 5)
    with pytest.raises(RuntimeError, match="not whole batches of 3"):
        fresh.step(StepOutputs(embeddings=z3, scores=[], prototypes=[], indices=model.indices[:3]), 2)


def test_the_optimizer_never_moves_the_centroids(tmp_path):
    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    model = place_model(cfg, build_model(cfg), torch.device("cpu"))
    ctx = build_step_context(cfg, model, torch.device("cpu"))
    # The model has no prototypes and the loss no parameters: nothing of the clustering is trainable.
    assert model.prototype_weights() == [] and list(ctx.objective.parameters()) == []
    trained = {p.data_ptr() for group in ctx.optimizer.param_groups for p in group["params"]}
    assert not trained & {c.data_ptr() for c in ctx.objective.centroids()}
    fake = FakeModel(16, 16, num_bank_crops=2, first_index=0)
    ctx.objective.start_epoch(0, fake.context())
    centroids = [c.clone() for c in ctx.objective.centroids()]
    trunk = next(model.trunk.parameters()).detach().clone()
    g = torch.Generator().manual_seed(0)
    for iteration in range(2):
        crops = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
        train_step(ctx, crops, iteration, lr=0.5, indices=fake.indices[iteration * 8 : (iteration + 1) * 8])
    assert not torch.equal(trunk, next(model.trunk.parameters()))
    for before, after in zip(centroids, ctx.objective.centroids(), strict=True):
        assert torch.equal(before, after)


# ------------------------------------------------------------------------------ configs


def test_the_8node_config_is_the_papers_best_and_takes_the_crop_groups():
    base = "config=pretrain/deepcluster_v2/deepclusterv2_8node_resnet"
    cfg = load_config([base])
    loss = cfg.LOSS.deepclusterv2_loss
    assert cfg.LOSS.name == "deepclusterv2_loss" and cfg.OPTIMIZER.num_epochs == 800
    assert (list(loss.num_clusters), loss.temperature, loss.kmeans_iters) == ([3000, 3000, 3000], 0.1, 10)
    assert (loss.num_crops, list(cfg.DATA.TRAIN.TRANSFORMS[0].size_crops)) == (8, [224, 96])
    assert loss.memory_params.embedding_dim == 128
    assert cfg.OPTIMIZER.param_schedulers.lr.scaled.base_value == pytest.approx(4.8)
    with torch.device("meta"):
        assert build_model(cfg).prototype_weights() == []
    for option, crops in (("multicrop_2x160_4x96", 6), ("multicrop_2x224", 2)):
        other = load_config([base, f"+config/pretrain/swav/transforms={option}"])
        assert other.LOSS.deepclusterv2_loss.num_crops == crops


@pytest.mark.parametrize(
    "override, message",
    [
        ('config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 2048, 128], "num_clusters": [500]}]]',
         "set num_clusters: \\[\\] in the head"),
        ("config.LOSS.deepclusterv2_loss.memory_params.crops_for_mb=[0, 2]", "crops_for_mb=\\[0, 2\\]: each entry"),
        ("config.LOSS.deepclusterv2_loss.num_clusters=[]", "needs at least one entry"),
        ("config.LOSS.deepclusterv2_loss.kmeans_iters=0", "kmeans_iters=0: must be an integer in \\[1, 1000\\]"),
        ("config.LOSS.deepclusterv2_loss.temperature=0", "temperature=0.0: must be a number > 0"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([RECIPE, override])


def test_the_cpu_recipe_trains_two_iterations_at_32_px_on_synthetic_data(tmp_path):
    cfg = load_config([RECIPE, "config.DATA.TRAIN.DATA_SOURCES=[synthetic]", "config.DATA.TRAIN.DATA_PATHS=[train]",
                       "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=512", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
                       "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DATA.NUM_DATALOADER_WORKERS=0",
                       "config.MODEL.AMP_PARAMS.USE_AMP=false", "config.KNN_MONITOR.ENABLED=false",
                       "config.LOG_FREQUENCY=1", f"config.CHECKPOINT.DIR={tmp_path}"])
    assert list(cfg.LOSS.deepclusterv2_loss.num_clusters) == [500, 500, 500]
    result = train(cfg, stop_after_iters=2)
    assert result["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))
    saved = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["loss"]
    assert saved["bank"].shape == (2, 512, 128) and saved["centroids2"].shape == (500, 128)


# ------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("whole")
    train(tiny(run))
    return run


@pytest.mark.parametrize("stop", [3, 5])  # inside epoch 0 (labels from the pass) and epoch 1 (from the bank)
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(uninterrupted, tmp_path, stop):
    # Fails if the bank, the epoch's labels or the centroids are not in the checkpoint, or if a run
    # resumed inside an epoch computed its labels again from the half-overwritten bank.
    result = train(tiny(tmp_path), stop_after_iters=stop)
    assert result["stopped"] and result["iteration"] == stop
    stopped = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert stopped["loss"]["bank"].shape == (2, 32, 16) and int(stopped["loss"]["labelled_epoch"]) == stop // 4
    train(tiny(tmp_path))
    assert losses(tmp_path) == losses(uninterrupted)
    a = checkpoint.load(uninterrupted / checkpoint.CHECKPOINT_NAME)
    b = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert a["iteration"] == b["iteration"] == 8
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), f"{part} {key}"
    log = (tmp_path / "log.txt").read_text()
    assert log.count("memory bank filled") == 1  # the resume found its bank in the checkpoint


# ------------------------------------------------------------------------------ one vs two processes


def _assignment_worker(rank: int, port: int, model: FakeModel, out_dir: str) -> None:
    _join_gloo(rank, port)
    try:
        mine = slice(0, 20) if rank == 0 else slice(20, None)
        part = FakeModel(1, 5, 2)
        part.indices, part.embeddings = model.indices[mine], model.embeddings[:, mine]
        loss_fn = small_loss()
        loss_fn.start_epoch(0, part.context())
        torch.save({"centroids": loss_fn.centroids(), "table": loss_fn.table}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_processes_assign_like_one_process_with_both_banks(tmp_path):
    model = FakeModel(36, 5, num_bank_crops=2, seed=3)
    run_two_processes(_assignment_worker, (model, str(tmp_path)))
    one = small_loss()
    one.start_epoch(0, model.context())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # Every rank can look up every image, its own and the other rank's.
        assert torch.equal(got["table"], one.table)
        for mine, expected in zip(got["centroids"], one.centroids(), strict=True):
            torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)


def test_two_processes_stopped_and_resumed_end_like_an_uninterrupted_run(tmp_path):
    # The whole loop with two processes: each fills its own bank with its images, k-means and the
    # label table span both, and each rank's bank comes back from the checkpoint to that rank.
    two = [*TINY, "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=64", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_two_processes([*two, f"config.CHECKPOINT.DIR={whole}"])
    train_two_processes([*two, f"config.CHECKPOINT.DIR={parts}"], stop_after=6)
    stopped = checkpoint.load(parts / checkpoint.CHECKPOINT_NAME)
    banks = [state["bank_indices"] for state in stopped["loss_per_rank"]]
    assert (stopped["iteration"], stopped["position"]) == (6, 16)
    for rank, bank in enumerate(banks):  # the rows of epoch 1 so far are this rank's images of epoch 1
        sampler = ResumableSampler(64, seed=0, rank=rank, world_size=2)
        sampler.set_epoch(1)
        assert bank[:16].tolist() == sampler.rank_indices()[:16]
    train_two_processes([*two, f"config.CHECKPOINT.DIR={parts}"])
    assert losses(parts) == pytest.approx(losses(whole), rel=1e-6, abs=1e-7)
    a = checkpoint.load(whole / checkpoint.CHECKPOINT_NAME)
    b = checkpoint.load(parts / checkpoint.CHECKPOINT_NAME)
    for rank, (x, y) in enumerate(zip(a["loss_per_rank"], b["loss_per_rank"], strict=True)):
        for key, value in x.items():
            torch.testing.assert_close(y[key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")


def test_the_memory_bank_pass_augments_in_the_step_as_the_loader_does(tmp_path):
    # With GPU_AUGMENT the bank's first filling (a pass over the data) augments on the device too.
    train(tiny(tmp_path / "loader"))
    train(tiny(tmp_path / "step", "config.DATA.TRAIN.GPU_AUGMENT=true"))
    assert losses(tmp_path / "step") == losses(tmp_path / "loader")


def test_a_run_of_two_processes_resumes_in_one_with_its_bank_filled_again(tmp_path):
    # Each rank's bank holds that rank's images, which another number of processes cannot re-deal:
    # the resumed run fills its own bank with a pass, clusters it, and every image has a label.
    run = tmp_path / "run"
    args = [*TINY, "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=64", f"config.CHECKPOINT.DIR={run}"]
    train_two_processes([*args, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"], stop_after=6)
    stopped = checkpoint.load(run / checkpoint.CHECKPOINT_NAME)
    assert (stopped["world_size"], stopped["iteration"], stopped["epoch"]) == (2, 6, 1)
    result = train(load_config([*args, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]))
    assert result["iteration"] == 16  # epoch 1 goes on after the 2 x 16 images already seen
    log = (run / "log.txt").read_text()
    assert "written by 2 processes and this run has 1" in log
    assert log.count("memory bank filled") == 2  # the first run (rank 0 logs) and the resumed one
    state = checkpoint.load(run / checkpoint.CHECKPOINT_NAME)
    assert state["world_size"] == 1 and sorted(state["loss"]["bank_indices"].tolist()) == list(range(64))
    assert all(v == v and abs(v) < 1e6 for v in losses(run))

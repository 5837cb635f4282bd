"""SimCLR with multi-crop: the loss against its formula, gradients, two processes against one,
the head without prototypes, the config rules and the packaged recipes."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_promises import TINY_TRUNK, train_two_processes

from swav import checkpoint
from swav.build import build_model, build_objective
from swav.config import ConfigError, load_config
from swav.distributed import free_port
from swav.losses import SimCLRLoss, StepOutputs, multicrop_info_nce
from swav.losses.simclr import gather_with_grad, global_crop_major, rank_rows
from swav.models import SwAVHead
from swav.report import build_report
from swav.train import train
from swav.weights import export_trunk

EIGHT_NODE = "config=pretrain/simclr/simclr_8node_resnet"
CIFAR = "config=pretrain/simclr/simclr_cifar10_resnet18"


def reference_loss(z: torch.Tensor, num_crops: int, temperature: float) -> float:
    """The formula of appendix A.8 with explicit loops, in float64 Python arithmetic."""
    z = z.double().tolist()
    batch = len(z) // num_crops

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(z[i], z[j], strict=True)) / temperature

    terms = []
    for i in range(len(z)):
        negatives = sum(math.exp(sim(i, n)) for n in range(len(z)) if n % batch != i % batch)
        for p in range(len(z)):
            if p != i and p % batch == i % batch:
                positive = math.exp(sim(i, p))
                terms.append(-math.log(positive / (positive + negatives)))
    assert len(terms) == len(z) * (num_crops - 1)
    return sum(terms) / len(terms)


def reference_loss_autograd(z: torch.Tensor, num_crops: int, temperature: float) -> torch.Tensor:
    """The same loops with torch operations, so autograd gives the reference gradient."""
    batch = z.shape[0] // num_crops
    terms = []
    for i in range(z.shape[0]):
        negatives = sum(torch.exp(z[i] @ z[n] / temperature) for n in range(z.shape[0]) if n % batch != i % batch)
        for p in range(z.shape[0]):
            if p != i and p % batch == i % batch:
                positive = torch.exp(z[i] @ z[p] / temperature)
                terms.append(-torch.log(positive / (positive + negatives)))
    return torch.stack(terms).mean()


def embeddings(rows: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_crops, batch, temperature", [(3, 4, 0.1), (2, 5, 0.5), (6, 3, 0.2)])
def test_loss_equals_the_formula(num_crops, batch, temperature):
    z = embeddings(num_crops * batch, 8, seed=num_crops)
    expected = reference_loss(z, num_crops, temperature)
    assert multicrop_info_nce(z, num_crops, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert multicrop_info_nce(z.double(), num_crops, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_other_positives_are_not_in_the_denominator():
    # With every positive in the denominator too (SupCon's "out" form) the value would differ.
    z = embeddings(12, 8, seed=1, dtype=torch.float64)
    logits = z @ z.t() / 0.1
    batch = 4
    same = (torch.arange(12) % batch).unsqueeze(1) == (torch.arange(12) % batch).unsqueeze(0)
    eye = torch.eye(12, dtype=torch.bool)
    all_but_self = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    supcon = -(logits - all_but_self)[same & ~eye].mean()
    assert multicrop_info_nce(z, 3, 0.1).item() == pytest.approx(reference_loss(z, 3, 0.1), rel=1e-12)
    assert multicrop_info_nce(z, 3, 0.1).item() != pytest.approx(supcon.item(), rel=1e-3)


def test_loss_is_stable_where_the_exponentials_overflow():
    # All crops equal at T = 0.01: every logit is 100, and exp(100) is inf in float32.
    z = F.normalize(torch.ones(3 * 4, 8), dim=1)
    loss = multicrop_info_nce(z, 3, 0.01)
    # One positive against N - M equal negatives: log(1 + N - M).
    assert loss.item() == pytest.approx(math.log(1 + 12 - 3), rel=1e-5)  # logits of 100 carry float32 rounding
    assert torch.isfinite(torch.exp(torch.tensor(100.0))).item() is False


def test_gradient_equals_the_float64_reference():
    z64 = embeddings(3 * 4, 6, seed=3, dtype=torch.float64).requires_grad_()
    reference_loss_autograd(z64, 3, 0.2).backward()
    z32 = z64.detach().float().requires_grad_()
    multicrop_info_nce(z32, 3, 0.2).backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    # And the float64 path against finite differences.
    z = embeddings(3 * 3, 4, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: multicrop_info_nce(x, 3, 0.3), (z,))


def test_shares_of_the_anchors_average_to_the_whole_loss():
    num_crops, batch, world = 3, 2, 2
    z = embeddings(num_crops * batch * world, 8, seed=5)
    parts = [multicrop_info_nce(z, num_crops, 0.1, rank_rows(num_crops, batch, world, r)) for r in range(world)]
    assert (sum(parts) / world).item() == pytest.approx(multicrop_info_nce(z, num_crops, 0.1).item(), rel=1e-6)
    # Every row is some rank's anchor exactly once.
    rows = torch.cat([rank_rows(num_crops, batch, world, r) for r in range(world)])
    assert sorted(rows.tolist()) == list(range(num_crops * batch * world))


def test_gathered_rows_are_the_global_batch_crop_major():
    # Rank r holds images [r * B, (r + 1) * B), its rows crop-major: one process of 2B in rank order.
    num_crops, batch, world, dim = 3, 2, 2, 4
    images = torch.randn(num_crops, world * batch, dim)  # [crop, image, D]
    whole = images.reshape(-1, dim)
    per_rank = torch.stack([images[:, r * batch:(r + 1) * batch].reshape(-1, dim) for r in range(world)])
    assert torch.equal(global_crop_major(per_rank, num_crops), whole)
    for r in range(world):
        assert torch.equal(whole[rank_rows(num_crops, batch, world, r)], per_rank[r])
    # Without a process group the gather is the tensor itself.
    assert torch.equal(gather_with_grad(whole), whole.unsqueeze(0))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2 images"):
        multicrop_info_nce(embeddings(3, 4, seed=0), 3, 0.1)
    with pytest.raises(ValueError, match="num_crops >= 2"):
        multicrop_info_nce(embeddings(4, 4, seed=0), 1, 0.1)
    with pytest.raises(ValueError, match=r"\[num_crops \* B, 16\]"):
        SimCLRLoss(num_crops=2, embedding_dim=16)(embeddings(4, 8, seed=0))
    nan = torch.full((4, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="lower learning rate"):
        SimCLRLoss(num_crops=2, embedding_dim=8).step(StepOutputs(nan, [], []), iteration=7)


# ----------------------------------------------------------------------------------------------
# Two processes of batch B against one process of batch 2B
# ----------------------------------------------------------------------------------------------

NUM_CROPS, BATCH, IN_DIM, EMB_DIM = 3, 4, 10, 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, 16), torch.nn.ReLU(), torch.nn.Linear(16, EMB_DIM))


def _inputs() -> torch.Tensor:
    """[crop, image, features] for the 2B images of the global batch."""
    return torch.randn(NUM_CROPS, 2 * BATCH, IN_DIM, generator=torch.Generator().manual_seed(1))


def _step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = F.normalize(model(x), dim=1)
    z.retain_grad()
    loss = SimCLRLoss(NUM_CROPS, temperature=0.2, embedding_dim=EMB_DIM).step(StepOutputs(z, [], []), 0)
    loss.backward()
    return loss.detach(), z.grad


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x = _inputs()[:, rank * BATCH:(rank + 1) * BATCH].reshape(-1, IN_DIM)  # this rank's images, crop-major
        loss, z_grad = _step(model, x)
        torch.save({"loss": loss, "z_grad": z_grad, "grads": [p.grad for p in model.parameters()]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_of_b_equal_one_process_of_2b(tmp_path):
    ctx = mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the two processes did not finish in 120 s"

    model = _model()
    loss, z_grad = _step(model, _inputs().reshape(-1, IN_DIM))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Each process's loss is its own anchors' mean; their mean (what the loop logs) is the loss.
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"].item(), rel=1e-3)
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(loss.item(), rel=1e-5)
    # DistributedDataParallel averages the parameter gradients over the processes: that average
    # is the gradient of the whole batch's loss, on both.
    for r in ranks:
        for got, p in zip(r["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    # Before that average each process holds world x its rows' gradient (the summed backward of
    # the gather), which the average divides by the world size again.
    whole = z_grad.view(NUM_CROPS, 2 * BATCH, EMB_DIM)
    for rank, r in enumerate(ranks):
        mine = whole[:, rank * BATCH:(rank + 1) * BATCH].reshape(-1, EMB_DIM)
        torch.testing.assert_close(r["z_grad"] / 2, mine, rtol=1e-4, atol=1e-7)


# A whole run on the tiny RegNet of test_promises.py: 1 process of 16 against 2 of 8, BatchNorm
# synchronised over both, float32. The first iteration's logged loss (the mean over processes)
# depends only on the initial weights and the global batch; the second on the first update.
SIMCLR_TINY = [
    CIFAR,
    *TINY_TRUNK,
    "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
    "config.DATA.TRAIN.DATA_PATHS=[train]",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
    'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 64, 16], "use_bn": true}]]',
    'config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 3, "num_crops": [3], '
    '"size_crops": [32], "crop_scales": [[0.3, 1]]}, {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ToTensor"}]',
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=32",
    "config.OPTIMIZER.num_epochs=1",
    "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
    "config.OPTIMIZER.param_schedulers.lr.base_value=0.05",
    "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=true",
    "config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=0",
]


def _logged_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_two_process_run_trains_like_one_process(tmp_path):
    train(load_config([*SIMCLR_TINY, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
                       f"config.CHECKPOINT.DIR={tmp_path / 'one'}"]))
    train_two_processes([*SIMCLR_TINY, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
                         "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", f"config.CHECKPOINT.DIR={tmp_path / 'two'}"])
    one, two = _logged_losses(tmp_path / "one"), _logged_losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-4)
    weights = [checkpoint.load(tmp_path / run / checkpoint.CHECKPOINT_NAME)["model"] for run in ("one", "two")]
    for name, value in weights[0].items():
        if value.is_floating_point():
            scale = value.abs().max().item()
            assert (weights[1][name] - value).abs().max().item() <= 1e-4 * scale + 1e-6, name


# ----------------------------------------------------------------------------------------------
# The head, the config and the recipes
# ----------------------------------------------------------------------------------------------


def test_the_mlp_head_has_no_prototypes():
    cfg = load_config([EIGHT_NODE])
    with torch.device("meta"):
        model = build_model(cfg)
    head = model.heads[0]
    assert isinstance(head, SwAVHead) and model.prototype_weights() == []
    assert [type(m).__name__ for m in head.projection_head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    small = SwAVHead(dims=[8, 16, 4], num_clusters=[])
    z, scores = small(torch.randn(5, 8))
    assert scores == [] and torch.allclose(z.norm(dim=1), torch.ones(5))
    small.normalize_prototypes()  # nothing to normalise, nothing fails


def test_the_8node_recipe_composes():
    cfg = load_config([EIGHT_NODE])
    loss = cfg.LOSS.simclr_info_nce_loss
    assert cfg.LOSS.name == "simclr_info_nce_loss"
    assert (loss.temperature, loss.num_crops, loss.embedding_dim) == (0.1, 6, 128)
    crops = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert (list(crops.num_crops), list(crops.size_crops)) == ([2, 4], [160, 96])
    assert list(crops.crop_scales[0]) == [0.08, 1.0]
    assert cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE == 4096
    assert cfg.OPTIMIZER.use_larc and cfg.OPTIMIZER.num_epochs == 400
    assert cfg.OPTIMIZER.param_schedulers.lr.scaled.base_value == pytest.approx(4.8)
    # The SwAV section is not inferred for this run: it keeps its defaults.
    assert list(cfg.LOSS.swav_loss.num_prototypes) == [3000]
    objective = build_objective(cfg)
    assert isinstance(objective, SimCLRLoss) and objective.num_crops == 6 and objective.temperature == 0.1


def test_swav_settings_in_a_simclr_run_are_refused():
    with pytest.raises(ConfigError, match=r"config.LOSS.swav_loss.epsilon=0.03 is a setting of the method "
                                          r"swav_loss.*config.LOSS.name=simclr_info_nce_loss"):
        load_config([EIGHT_NODE, "config.LOSS.swav_loss.epsilon=0.03"])
    with pytest.raises(ConfigError, match="config.LOSS.swav_loss.queue.queue_length=3840 is a setting of the method swav_loss"):
        load_config([EIGHT_NODE, "config.LOSS.swav_loss.queue.queue_length=3840"])
    with pytest.raises(ConfigError, match="config.LOSS.simclr_info_nce_loss.temperature=0.3 is a setting of the "
                                          "method simclr_info_nce_loss"):
        load_config(["config=pretrain/swav/swav_8node_resnet", "config.LOSS.simclr_info_nce_loss.temperature=0.3"])
    # The SwAV-only checks stay quiet: a queue shorter than the batch would be refused for SwAV.
    load_config([EIGHT_NODE, "config.DISTRIBUTED.NUM_NODES=1"])


def test_heads_must_suit_the_method():
    with pytest.raises(ConfigError, match="simclr_info_nce_loss uses no prototypes.*num_clusters=\\[30\\]"):
        load_config([EIGHT_NODE, 'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 2048, 128], "num_clusters": [30]}]]'])
    with pytest.raises(ConfigError, match="mlp does not take \\['num_clusters'\\]"):
        load_config([EIGHT_NODE, 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 128], "num_clusters": [30]}]]'])
    with pytest.raises(ConfigError, match="the mlp head has no prototypes, which swav_loss needs"):
        load_config(["config=pretrain/swav/swav_8node_resnet", 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 128]}]]'])
    with pytest.raises(ConfigError, match="must be a number > 0"):
        load_config([EIGHT_NODE, "config.LOSS.simclr_info_nce_loss.temperature=0"])


def _cpu_recipe(run_dir, head: str) -> list[str]:
    """The CIFAR recipe on 16 synthetic images, one process of 8: two iterations at 32 px."""
    return [
        CIFAR,
        "config.DATA.TRAIN.DATA_SOURCES=[synthetic]", "config.DATA.TRAIN.DATA_PATHS=[train]",
        "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=16", "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=16",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
        "config.DATA.NUM_DATALOADER_WORKERS=0", "config.OPTIMIZER.num_epochs=1", "config.LOG_FREQUENCY=1",
        "config.MODEL.AMP_PARAMS.USE_AMP=false",  # bfloat16 is emulated, and slow, on some CPUs
        "config.KNN_MONITOR.TRAIN.DATA_SOURCES=[synthetic]", "config.KNN_MONITOR.TRAIN.DATA_PATHS=[train]",
        "config.KNN_MONITOR.TEST.DATA_SOURCES=[synthetic]", "config.KNN_MONITOR.TEST.DATA_PATHS=[test]",
        f"config.MODEL.HEAD.PARAMS={head}", f"config.CHECKPOINT.DIR={run_dir}",
    ]


def test_the_cpu_recipe_trains_and_its_run_is_evaluated_reported_and_exported(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(_cpu_recipe(run, '[["mlp", {"dims": [512, 2048, 128], "use_bn": true}]]'))
    assert (cfg.LOSS.simclr_info_nce_loss.temperature, cfg.LOSS.simclr_info_nce_loss.num_crops) == (0.2, 2)
    summary = train(cfg)
    losses = _logged_losses(run)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # At initialisation the embeddings barely agree: the loss starts near log(1 + N - M).
    assert losses[0] == pytest.approx(math.log(1 + 16 - 2), rel=0.2)
    assert "trained" in summary["knn"]  # the kNN monitor scores the trunk
    # The resolved config re-infers to itself, and the run resumes as complete.
    assert load_config([f"config={run / 'train_config.yaml'}"]) == cfg
    assert train(cfg)["iteration"] == 2
    state = checkpoint.load(run / checkpoint.CHECKPOINT_NAME)
    assert state["loss_per_rank"] == [{}]  # SimCLR keeps no per-rank state
    info = export_trunk(run / checkpoint.FINAL_NAME, tmp_path / "trunk.torch")
    assert info["tensors"] > 0
    assert not any(k.startswith(("heads", "projection_head")) for k in torch.load(tmp_path / "trunk.torch"))
    report = build_report(run, num_images=16)
    assert any("no prototypes" in note for note in report["notes"])
    html = report["html"].read_text()
    assert "simclr_info_nce_loss" in html and "temperature 0.2" in html


def test_a_swav_head_without_prototypes_trains_too(tmp_path):
    cfg = load_config(_cpu_recipe(tmp_path, '[["swav_head", {"dims": [512, 64, 16], "use_bn": true, "num_clusters": []}]]')
                      + ["config.KNN_MONITOR.ENABLED=false"])
    train(cfg)
    assert len(_logged_losses(tmp_path)) == 2


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def test_the_15_minute_recipe_is_the_cpu_recipe_with_the_screens_trunk_crops_and_epochs(tmp_path):
    # Fails if the budget recipe drifts from the recipe it was measured as (a quarter-width
    # ResNet-18, stride-1 3x3 stem, 2 x 32 + 4 x 16 px crops, 5 epochs, weight decay 5e-4), or if
    # that trunk does not train at 32 px.
    from omegaconf import OmegaConf

    def tree(recipe: str) -> dict:
        return _flat(OmegaConf.to_container(load_config([recipe]), resolve=True))

    fast, base = tree("config=pretrain/simclr/simclr_cifar10_15min"), tree(CIFAR)
    changed = {key: fast[key] for key in fast if fast[key] != base.get(key)}
    transforms = list(base["DATA.TRAIN.TRANSFORMS"])
    transforms[0] = {"name": "ImgPilToMultiCrop", "total_num_crops": 6, "num_crops": [2, 4], "size_crops": [32, 16],
                     "crop_scales": [[0.2, 1.0], [0.08, 0.4]]}
    assert changed == {
        "DATA.TRAIN.TRANSFORMS": transforms,
        "LOSS.simclr_info_nce_loss.num_crops": 6,
        "MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER": 0.25,
        "MODEL.TRUNK.RESNETS.SMALL_STEM": True,
        "MODEL.HEAD.PARAMS": [["mlp", {"dims": [128, 2048, 128], "use_bn": True}]],
        "OPTIMIZER.weight_decay": 5.0e-4,
        "OPTIMIZER.num_epochs": 5,
        "KNN_MONITOR.EPOCH_FREQUENCY": 2,
        "CHECKPOINT.DIR": "./checkpoints/simclr_cifar10_15min",
    }
    recipe = _cpu_recipe(tmp_path, '[["mlp", {"dims": [128, 2048, 128], "use_bn": true}]]')
    recipe[0] = "config=pretrain/simclr/simclr_cifar10_15min"
    train(load_config([*recipe, "config.KNN_MONITOR.ENABLED=false"]))
    assert all(math.isfinite(v) for v in _logged_losses(tmp_path))


def test_the_swav_15_minute_recipe_is_the_simclr_one_with_the_screened_swav_objective(tmp_path):
    # Fails if the SwAV budget recipe drifts from the run it was measured as: the SimCLR 15-minute
    # recipe with the SwAV loss, 300 prototypes never trained, epsilon 0.02, temperature 0.2,
    # LR 0.3 and weight decay 1e-6; and it must train at 32 px with its head.
    from omegaconf import OmegaConf

    def tree(recipe: str) -> dict:
        return _flat(OmegaConf.to_container(load_config([recipe]), resolve=True))

    swav, simclr = tree("config=pretrain/swav/swav_cifar10_15min"), tree("config=pretrain/simclr/simclr_cifar10_15min")
    changed = {key: swav[key] for key in swav if swav[key] != simclr.get(key)}
    head = '[["swav_head", {"dims": [128, 2048, 128], "use_bn": true, "num_clusters": [300]}]]'
    assert changed == {
        "MODEL.HEAD.PARAMS": json.loads(head),
        "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP": [["heads.0.prototypes0.weight", -1]],
        "LOSS.name": "swav_loss",
        "LOSS.swav_loss.temperature": 0.2,
        "LOSS.swav_loss.epsilon": 0.02,
        "LOSS.swav_loss.num_crops": 6,
        "LOSS.swav_loss.num_prototypes": [300],
        "LOSS.swav_loss.output_dir": "./checkpoints/swav_cifar10_15min",
        "OPTIMIZER.weight_decay": 1.0e-6,
        "OPTIMIZER.param_schedulers.lr.base_value": 0.3,
        "OPTIMIZER.param_schedulers.lr.scaled.base_value": 0.3,
        "CHECKPOINT.DIR": "./checkpoints/swav_cifar10_15min",
        # The SimCLR section keeps its defaults: a method's keys are set only when it runs.
        "LOSS.simclr_info_nce_loss.temperature": 0.1,
        "LOSS.simclr_info_nce_loss.num_crops": 2,
    }
    recipe = _cpu_recipe(tmp_path, head)
    recipe[0] = "config=pretrain/swav/swav_cifar10_15min"
    train(load_config([*recipe, "config.KNN_MONITOR.ENABLED=false"]))
    assert all(math.isfinite(v) for v in _logged_losses(tmp_path))


def test_the_60_minute_recipe_is_the_15_minute_one_for_23_epochs():
    # Fails if the hour recipe drifts from what it was measured as: the 15-minute recipe for 23
    # epochs (the trunk itself is trained by the 15-minute recipe's test).
    from omegaconf import OmegaConf

    def tree(recipe: str) -> dict:
        return _flat(OmegaConf.to_container(load_config([recipe]), resolve=True))

    hour, fast = tree("config=pretrain/simclr/simclr_cifar10_60min"), tree("config=pretrain/simclr/simclr_cifar10_15min")
    changed = {key: hour[key] for key in hour if hour[key] != fast.get(key)}
    assert changed == {
        "OPTIMIZER.num_epochs": 23,
        "KNN_MONITOR.EPOCH_FREQUENCY": 6,
        "CHECKPOINT.DIR": "./checkpoints/simclr_cifar10_60min",
    }

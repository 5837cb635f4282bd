"""Every command of the SwAV training guide, the model/transform/optimization groups and the
paper's ablations: each composes, builds (big trunks on the meta device), and the small ones
train one step at a tiny resolution."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from test_sinkhorn import official_reference

from swav.build import (
    StepContext,
    build_loss,
    build_lr_schedule,
    build_model,
    build_step_context,
    place_model,
)
from swav.config import ConfigError, load_config
from swav.data import build_transforms
from swav.losses import SwAVLoss
from swav.models import SwAVHead
from swav.train import train_step

BASE = "config=pretrain/swav/swav_8node_resnet"
GROUP = "+config/pretrain/swav"
REGNET_256GF = [
    "config.MODEL.TRUNK.NAME=regnet",
    "config.MODEL.TRUNK.REGNET.depth=27",
    "config.MODEL.TRUNK.REGNET.w_0=640",
    "config.MODEL.TRUNK.REGNET.w_a=230.83",
    "config.MODEL.TRUNK.REGNET.w_m=2.53",
    "config.MODEL.TRUNK.REGNET.group_width=373",
]
HEAD_256GF = ('config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [10444, 10444, 128], "use_bn": False, '
              '"num_clusters": [3000]}]]')

# The guide's 14 commands (with `swav train` in place of tools/run_distributed_engines.py):
# id -> (overrides after BASE, expected values, trunk features, trunk parameters in millions,
# trains one step here). Parameter counts are torchvision's for the same architecture.
# The base recipe as configured already runs bfloat16 autocast and LARC with SyncBN settings
# (commands 1-4), so commands that only restate those, or change the epochs or world size, are
# checked on the composed config and the meta-device model; every other small one trains a step.
GUIDE = {
    "01_8node_resnet": ([], {"LOSS.swav_loss.num_crops": 8}, 2048, 23.51, True),
    "02_syncbn_pytorch": (["config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch"],
                          {"MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE": "pytorch"}, 2048, 23.51, False),
    "02_syncbn_apex": (["config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex"],
                       {"MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE": "apex"}, 2048, 23.51, False),
    "03_amp_o1": (["config.MODEL.AMP_PARAMS.USE_AMP=True", 'config.MODEL.AMP_PARAMS.AMP_ARGS={"opt_level": "O1"}'],
                  {"MODEL.AMP_PARAMS.USE_AMP": True, "MODEL.AMP_PARAMS.AMP_ARGS.opt_level": "O1"}, 2048, 23.51, False),
    "03_amp_o3": (["config.MODEL.AMP_PARAMS.USE_AMP=True",
                   'config.MODEL.AMP_PARAMS.AMP_ARGS={"opt_level": "O3", "keep_batchnorm_fp32": True, '
                   '"master_weights": True, "loss_scale": "dynamic"}'],
                  {"MODEL.AMP_PARAMS.AMP_ARGS.opt_level": "O3", "MODEL.AMP_PARAMS.AMP_ARGS.loss_scale": "dynamic"},
                  2048, 23.51, False),
    "04_larc": (["config.OPTIMIZER.use_larc=True", "config.OPTIMIZER.larc_config.clip=False",
                 "config.OPTIMIZER.larc_config.eps=1e-08", "config.OPTIMIZER.larc_config.trust_coefficient=0.001"],
                {"OPTIMIZER.use_larc": True, "OPTIMIZER.larc_config.eps": 1e-8}, 2048, 23.51, False),
    "05_loss": (["config.LOSS.swav_loss.temperature=0.2", "config.LOSS.swav_loss.epsilon=0.04"],
                {"LOSS.swav_loss.temperature": 0.2, "LOSS.swav_loss.epsilon": 0.04}, 2048, 23.51, True),
    "06_resnet101": ([f"{GROUP}/models=resnet101"], {"MODEL.TRUNK.RESNETS.DEPTH": 101}, 2048, 42.50, True),
    "07_resnet50_w2": ([f"{GROUP}/models=resnet50_w2"], {"MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER": 2},
                       4096, 93.91, False),
    "08_regnet400mf": ([f"{GROUP}/models=regnet400mf"], {"MODEL.TRUNK.REGNET.name": "regnet_y_400mf"},
                       440, 3.90, True),
    "09_regnet256gf": ([*REGNET_256GF, HEAD_256GF], {"MODEL.TRUNK.REGNET.w_a": 230.83}, 10444, 1272.16, False),
    "10_multicrop_2x224_4x96": ([f"{GROUP}/transforms=multicrop_2x224_4x96"],
                                {"LOSS.swav_loss.num_crops": 6}, 2048, 23.51, True),
    "11_mlp_3layer": (['config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 2048, 2048, 128], '
                       '"use_bn": True, "num_clusters": [3000]}]]'],
                      {"MODEL.HEAD.PARAMS.0.1.dims": [2048, 2048, 2048, 128]}, 2048, 23.51, True),
    "11_mlp_4096_hidden": (['config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 4096, 128], '
                            '"use_bn": True, "num_clusters": [3000]}]]'],
                           {"MODEL.HEAD.PARAMS.0.1.dims": [2048, 4096, 128]}, 2048, 23.51, False),
    "12_epochs_100": (["config.OPTIMIZER.num_epochs=100"], {"OPTIMIZER.num_epochs": 100}, 2048, 23.51, False),
    "13_one_gpu": (["config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"],
                   {"OPTIMIZER.param_schedulers.lr.scaled.base_value": 0.3 * 64 / 256}, 2048, 23.51, False),
    "13_32_gpus": (["config.DISTRIBUTED.NUM_NODES=4", "config.DISTRIBUTED.NUM_PROC_PER_NODE=8"],
                   {"OPTIMIZER.param_schedulers.lr.scaled.base_value": 0.3 * 2048 / 256}, 2048, 23.51, False),
    # The queue needs a global batch below 3840: the guide gives it with the small-batch setup.
    "14_queue_three_prototype_sets": (
        ["config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
         "config.LOSS.swav_loss.queue.queue_length=3840", "config.LOSS.swav_loss.queue.start_iter=75060",
         'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 2048, 128], "use_bn": True, '
         '"num_clusters": [3000, 3000, 3000]}]]'],
        {"LOSS.swav_loss.queue.local_queue_length": 960, "LOSS.swav_loss.num_prototypes": [3000, 3000, 3000]},
        2048, 23.51, True),
}


def _params_millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _tiny_crops(cfg, batch: int = 2) -> list[torch.Tensor]:
    """The config's number of crops, all at 32 px: the smallest the standard stems take."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(cfg.LOSS.swav_loss.num_crops)]


def _step_context(cfg, model) -> StepContext:
    device = torch.device("cpu")
    return build_step_context(cfg, place_model(cfg, model, device), device)


@pytest.mark.parametrize("name", list(GUIDE))
def test_guide_command_composes_builds_and_trains(name):
    overrides, expected, features, millions, trains = GUIDE[name]
    cfg = load_config([BASE, *overrides])
    for dotted, value in expected.items():
        got = OmegaConf.select(cfg, dotted)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(value), dotted
    head = cfg.MODEL.HEAD.PARAMS[0][1]
    assert head.dims[0] == features
    with torch.device("meta"):  # shapes only: a 1.3-billion-parameter trunk costs nothing here
        meta = build_model(cfg)
    assert meta.trunk.num_features == features
    assert _params_millions(meta.trunk) == pytest.approx(millions, abs=0.01)
    assert [w.shape[0] for w in meta.prototype_weights()] == list(cfg.LOSS.swav_loss.num_prototypes)
    if not trains:
        return

    start = cfg.LOSS.swav_loss.queue.start_iter  # the first queue iteration when there is one
    if start:  # two steps: float32 keeps them cheap (command 1 covers bfloat16)
        cfg = load_config([BASE, *overrides, "config.MODEL.AMP_PARAMS.USE_AMP=false"])
    torch.manual_seed(0)
    ctx = _step_context(cfg, build_model(cfg))
    crops = _tiny_crops(cfg)
    before = next(ctx.model.trunk.parameters()).detach().clone()
    losses = [train_step(ctx, crops, start + i, lr=0.05).item() for i in range(2 if start else 1)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, next(ctx.model.trunk.parameters()))
    if start:  # the second step predicted against the queue's rows too
        assert ctx.objective.num_filled == 2 * 2


def test_regnet_256gf_has_10444_channels_and_the_guide_head_fits():
    cfg = load_config([BASE, *REGNET_256GF, HEAD_256GF])
    with torch.device("meta"):
        model = build_model(cfg)
    last_block = model.trunk.trunk_output[-1][-1]
    assert last_block.f.c[0].out_channels == 10444 == model.trunk.num_features
    assert list(model.heads[0].dims) == [10444, 10444, 128]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.heads.modules())
    # The packaged group option is the same trunk.
    group = load_config([BASE, f"{GROUP}/models=regnet256Gf"])
    assert OmegaConf.to_container(group.MODEL.TRUNK) == OmegaConf.to_container(cfg.MODEL.TRUNK)


def test_regnet_y_400mf_parameters_equal_torchvision_without_fc():
    cfg = load_config([BASE, f"{GROUP}/models=regnet400mf"])
    with torch.device("meta"):
        trunk = build_model(cfg).trunk
    tv = torchvision.models.regnet_y_400mf()
    expected = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in trunk.parameters()) == expected == 3_903_144


@pytest.mark.parametrize(
    "overrides, head_dim, trunk_dim",
    [
        ([*REGNET_256GF, HEAD_256GF.replace("10444, 10444", "10240, 10444")], 10240, 10444),
        (['config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 128]}]]'], 512, 2048),
        ([f"{GROUP}/models=regnet400mf", "config.MODEL.TRUNK.REGNET.name=regnet_y_16gf"], 440, 3024),
        (["config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2"], 2048, 4096),
    ],
)
def test_head_must_match_the_trunk_width(overrides, head_dim, trunk_dim):
    with pytest.raises(ConfigError, match=f"dims\\[0\\]={head_dim} but the trunk .* gives {trunk_dim} features"):
        load_config([BASE, *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("config.MODEL.TRUNK.REGNET.name=regnet_y_401mf", "unknown RegNet name 'regnet_y_401mf'"),
        ("config.MODEL.TRUNK.REGNET.depth=12", "do not also set ['depth']"),
        ("config.MODEL.TRUNK.REGNET.w_0=12.5", "REGNET.w_0 must be an integer"),
    ],
)
def test_regnet_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config([BASE, f"{GROUP}/models=regnet400mf", override])
    assert "config.MODEL.TRUNK.REGNET" in str(err.value)
    with pytest.raises(ConfigError, match="missing \\['group_width'\\]"):
        load_config([BASE, *REGNET_256GF[:-1], HEAD_256GF])


# ------------------------------------------------------------------------------ config groups

# option -> (features, global batch, crops per resolution, crop sizes, queue length, trunk M params)
MODELS = {
    "resnet18": (512, 4096, [2, 6], [224, 96], 0, 11.18),
    "resnet34": (512, 4096, [2, 6], [224, 96], 0, 21.28),
    "resnet101": (2048, 4096, [2, 6], [224, 96], 0, 42.50),
    "resnext50": (2048, 4096, [2, 6], [224, 96], 0, 22.98),
    "resnext101": (2048, 4096, [2, 4], [224, 96], 0, 86.74),
    # Paper appendix B.2: R50-w2 4096 on 128 GPUs; w4 2560 + queue 2560; w5 1536 + queue 1536.
    "resnet50_w2": (4096, 4096, [2, 4], [224, 96], 0, 93.91),
    "resnet50_w4": (8192, 2560, [2, 4], [224, 96], 2560, 375.38),
    "resnet50_w5": (10240, 1536, [2, 4], [224, 96], 1536, 586.45),
    "regnet400mf": (440, 4096, [2, 6], [224, 96], 0, 3.90),
    "regnet16Gf": (3024, 4096, [2, 4], [224, 96], 0, 80.57),
    "regnet128Gf": (7392, 1536, [2, 4], [224, 96], 1536, 637.42),
    "regnet256Gf": (10444, 1024, [2, 4], [224, 96], 2048, 1272.16),
}


@pytest.mark.parametrize("option", list(MODELS))
def test_model_group_options(option):
    features, batch, num_crops, sizes, queue, millions = MODELS[option]
    cfg = load_config([BASE, f"{GROUP}/models={option}"])
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    assert cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world == batch
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert (list(spec.num_crops), list(spec.size_crops)) == (num_crops, sizes)
    assert cfg.LOSS.swav_loss.queue.queue_length == queue
    if queue:
        assert cfg.LOSS.swav_loss.queue.start_iter == 0
    # Every recipe keeps the paper's LR of 4.8 (at 4096) .. 0.0048, whatever its global batch.
    lr = cfg.OPTIMIZER.param_schedulers.lr.scaled
    assert (lr.base_value, lr.end_value) == (pytest.approx(4.8), pytest.approx(0.0048))
    assert cfg.MODEL.HEAD.PARAMS[0][1].dims[0] == features
    with torch.device("meta"):
        trunk = build_model(cfg).trunk
    assert trunk.num_features == features
    assert _params_millions(trunk) == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize(
    "option, num_crops, sizes, scales",
    [
        ("multicrop_2x224", [2], [224], [[0.14, 1.0]]),
        ("multicrop_2x224_4x96", [2, 4], [224, 96], [[0.14, 1.0], [0.05, 0.14]]),
        ("multicrop_2x224_6x96", [2, 6], [224, 96], [[0.14, 1.0], [0.05, 0.14]]),
        ("multicrop_2x160_4x96", [2, 4], [160, 96], [[0.14, 1.0], [0.05, 0.14]]),
        ("multicrop_6x160", [6], [160], [[0.14, 1.0]]),
        ("multicrop_2x160_4x96_simclr_scale", [2, 4], [160, 96], [[0.08, 1.0], [0.05, 0.14]]),
        ("multicrop_2x224_4x96_simclr_scale", [2, 4], [224, 96], [[0.08, 1.0], [0.05, 0.14]]),
    ],
)
def test_transform_group_options(option, num_crops, sizes, scales):
    cfg = load_config([BASE, f"{GROUP}/transforms={option}"])
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert list(spec.num_crops) == num_crops and list(spec.size_crops) == sizes
    assert [list(s) for s in spec.crop_scales] == scales
    assert cfg.LOSS.swav_loss.num_crops == sum(num_crops)
    # The crops only (the colour and blur steps are tested with the data module).
    transform = build_transforms([OmegaConf.to_container(spec), {"name": "ToTensor"}])
    crops = transform(Image.new("RGB", (240, 200), (120, 60, 30)), torch.Generator().manual_seed(0))
    expected = [s for n, s in zip(num_crops, sizes, strict=True) for _ in range(n)]
    assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in expected]


def test_default_crops_equal_the_2x224_6x96_option():
    default = load_config([BASE])
    option = load_config([BASE, f"{GROUP}/transforms=multicrop_2x224_6x96"])
    assert default.DATA.TRAIN.TRANSFORMS == option.DATA.TRAIN.TRANSFORMS


def test_head_group_options():
    for option, dims in (("mlp_3layer", [2048, 2048, 2048, 128]), ("mlp_4096_hidden", [2048, 4096, 128])):
        cfg = load_config([BASE, f"{GROUP}/heads={option}"])
        head = cfg.MODEL.HEAD.PARAMS[0][1]
        assert (list(head.dims), head.use_bn, list(head.num_clusters)) == (dims, True, [3000])


def test_small_batch_recipe_is_the_papers():
    cfg = load_config([BASE, f"{GROUP}/optimization=small_batch_256"])
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE, cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA) == (1, 4, 64)
    lr = cfg.OPTIMIZER.param_schedulers.lr
    assert (lr.scaled.base_value, lr.scaled.end_value, lr.warmup_epochs) == (pytest.approx(0.6), pytest.approx(0.0006), 0)
    queue = cfg.LOSS.swav_loss.queue
    iters_per_epoch = 1_281_167 // 256  # ImageNet-1k, last partial batch dropped
    assert (queue.queue_length, queue.start_iter) == (3840, 15 * iters_per_epoch)
    assert [list(x) for x in cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP] == [["heads.0.prototypes0.weight", 5005]]


@pytest.mark.parametrize("epochs", [100, 200, 400, 800])
def test_epoch_schedules(epochs):
    cfg = load_config([BASE, f"{GROUP}/optimization=epochs_{epochs}"])
    assert cfg.OPTIMIZER.num_epochs == epochs
    lr = build_lr_schedule(cfg, iters_per_epoch=10)
    assert len(lr) == 10 * epochs
    assert lr[99] < 4.8 and lr[100] == pytest.approx(4.8) and lr[-1] == pytest.approx(0.0048)
    # Merged after an epoch option, the small-batch recipe drops the warm-up again.
    small = load_config([BASE, f"{GROUP}/optimization=epochs_{epochs}", f"{GROUP}/optimization=small_batch_256"])
    assert small.OPTIMIZER.num_epochs == epochs and small.OPTIMIZER.param_schedulers.lr.warmup_epochs == 0


# ------------------------------------------------------------------------------------ ablations


def _swav_loss_f64(scores, num_crops, iters=3, hard=False, eps=0.05, temperature=0.1):
    b = scores.shape[0] // num_crops
    crops = scores.double().view(num_crops, b, -1)
    total = 0.0
    for c in (0, 1):
        q = official_reference(crops[c], eps, iters)
        if hard:
            q = F.one_hot(q.argmax(dim=1), q.shape[1]).double()
        others = [v for v in range(num_crops) if v != c]
        total += sum(-(q * F.log_softmax(crops[v] / temperature, dim=1)).sum(1).mean() for v in others) / len(others)
    return total / 2


def _cosine_scores(rows: int, k: int, seed: int = 0, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, d, generator=g), dim=1) @ F.normalize(torch.randn(k, d, generator=g), dim=1).t()


def test_hard_assignment_for_the_whole_run():
    cfg = load_config([BASE, "config.LOSS.swav_loss.temp_hard_assignment_iters=-1"])
    loss_fn = build_loss(cfg)
    scores = _cosine_scores(8 * 3, 11)  # 8 crops x 3 images
    hard = _swav_loss_f64(scores, 8, hard=True).item()
    assert hard != pytest.approx(_swav_loss_f64(scores, 8).item(), rel=1e-3)
    for iteration in (0, 1, 10**9):
        assert loss_fn(scores, iteration=iteration).item() == pytest.approx(hard, rel=1e-5)
    soft = SwAVLoss(num_crops=8, temp_hard_assignment_iters=0)(scores, iteration=0).item()
    assert soft == pytest.approx(_swav_loss_f64(scores, 8).item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"temp_hard_assignment_iters=-2: must be an integer >= -1"):
        load_config([BASE, "config.LOSS.swav_loss.temp_hard_assignment_iters=-2"])


@pytest.mark.parametrize("iters", [1, 3, 10, 30])
def test_sinkhorn_iterations(iters):
    cfg = load_config([BASE, f"config.LOSS.swav_loss.num_iters={iters}"])
    loss_fn = build_loss(cfg)
    assert loss_fn.num_iters == iters
    scores = _cosine_scores(8 * 16, 40, seed=iters)
    assert loss_fn(scores).item() == pytest.approx(_swav_loss_f64(scores, 8, iters=iters).item(), rel=1e-5)


def test_more_sinkhorn_iterations_equipartition_better():
    from swav.losses import sinkhorn

    scores = _cosine_scores(64, 20, seed=3)
    # Each prototype should get B/K of the mass; the error shrinks with the iterations.
    errors = [(sinkhorn(scores, 0.05, n).sum(0) - 64 / 20).abs().max().item() for n in (1, 3, 10, 30)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0]
    with pytest.raises(ConfigError, match=r"num_iters=0: must be an integer in \[1, 1000\]"):
        load_config([BASE, "config.LOSS.swav_loss.num_iters=0"])


@pytest.mark.parametrize("k", [300, 1000, 3000, 10_000, 30_000, 100_000])
def test_number_of_prototypes_from_300_to_100000(k):
    # Paper table 8 sweeps 300..100,000 prototypes; the head and loss scale linearly in K
    # (100,000 x 128 prototypes = 51 MB): one step on 2 crops x 16 images stays small and fast.
    cfg = load_config([BASE, f'config.MODEL.HEAD.PARAMS=[["swav_head", {{"dims": [2048, 2048, 128], "num_clusters": [{k}]}}]]',
                       "config.DATA.TRAIN.TRANSFORMS=[{\"name\": \"ImgPilToMultiCrop\", \"total_num_crops\": 2, "
                       "\"num_crops\": [2], \"size_crops\": [224], \"crop_scales\": [[0.14, 1]]}]"])
    assert list(cfg.LOSS.swav_loss.num_prototypes) == [k]
    torch.manual_seed(0)
    head = SwAVHead(dims=[64, 128], num_clusters=cfg.LOSS.swav_loss.num_prototypes)
    head.normalize_prototypes()
    x = torch.randn(2 * 16, 64, requires_grad=True)
    _, (scores,) = head(x)
    loss = build_loss(cfg)(scores)
    loss.backward()
    assert torch.isfinite(loss) and head.prototypes0.weight.grad.shape == (k, 128)
    assert 0 < loss.item() < 2 * torch.log(torch.tensor(float(k))).item()


def test_simclr_crop_scale_for_the_ablations():
    cfg = load_config([BASE, f"{GROUP}/transforms=multicrop_2x160_4x96_simclr_scale"])
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert [list(s) for s in spec.crop_scales] == [[0.08, 1.0], [0.05, 0.14]]
    # The other augmentations are the ones of the main recipe.
    assert list(cfg.DATA.TRAIN.TRANSFORMS)[1:] == list(load_config([BASE]).DATA.TRAIN.TRANSFORMS)[1:]


def test_fixed_random_prototypes_are_never_trained():
    # Paper table 9 (left): prototypes stay at their random initialisation (on the unit sphere).
    cfg = load_config([BASE, f"{GROUP}/models=regnet400mf", "config.MODEL.AMP_PARAMS.USE_AMP=false",
                       'config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[["heads.0.prototypes0.weight", -1]]'])
    torch.manual_seed(0)
    ctx = _step_context(cfg, build_model(cfg))
    ctx.model.normalize_prototypes()
    start = ctx.model.prototype_weights()[0].detach().clone()
    crops = _tiny_crops(cfg)
    before = next(ctx.model.trunk.parameters()).detach().clone()
    train_step(ctx, crops, 10**6, lr=0.1)  # long after any finite freeze
    assert not torch.equal(before, next(ctx.model.trunk.parameters()))
    # Only renormalisation rounding (~1e-8) may move them; one SGD step at LR 0.1 moves them ~1e-3.
    torch.testing.assert_close(ctx.model.prototype_weights()[0], start, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="iterations >= -1"):
        load_config([BASE, 'config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[["heads.0.prototypes0.weight", -2]]'])

"""Config composition, validation and inference, with the commands of the SwAV guide."""

from __future__ import annotations

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from swav.config import ConfigError, available_configs, load_config, to_yaml
from swav.config.compose import compose, parse_value
from swav.config.infer import infer

BASE = "config=pretrain/swav/swav_8node_resnet"


def test_quickstart_is_the_default():
    assert load_config([]) == load_config(["config=quickstart"])


def test_swav_8node_resnet_is_the_papers_recipe():
    cfg = load_config([BASE])
    assert cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 64
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (8, 8)
    crops = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert list(crops.num_crops) == [2, 6] and list(crops.size_crops) == [224, 96]
    assert [list(s) for s in crops.crop_scales] == [[0.14, 1.0], [0.05, 0.14]]
    assert cfg.OPTIMIZER.use_larc and not cfg.OPTIMIZER.larc_config.clip
    assert cfg.OPTIMIZER.larc_config.trust_coefficient == 0.001
    assert cfg.OPTIMIZER.weight_decay == 1e-6 and cfg.OPTIMIZER.num_epochs == 400
    assert cfg.MODEL.AMP_PARAMS.USE_AMP and cfg.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN
    lr = cfg.OPTIMIZER.param_schedulers.lr
    assert lr.scaled.base_value == pytest.approx(4.8)
    assert lr.scaled.end_value == pytest.approx(0.0048)
    assert lr.warmup_epochs == 10
    assert [list(x) for x in cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP] == [["heads.0.prototypes0.weight", 313]]
    loss = cfg.LOSS.swav_loss
    assert (loss.num_crops, loss.embedding_dim, list(loss.num_prototypes)) == (8, 128, [3000])
    assert (loss.temperature, loss.epsilon, loss.num_iters) == (0.1, 0.05, 3)
    assert loss.output_dir == cfg.CHECKPOINT.DIR


# The guide's commands, with `swav train` in place of `python tools/run_distributed_engines.py`.
GUIDE = [
    (["config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch"], {"MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE": "pytorch"}),
    (["config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex"], {"MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE": "apex"}),
    (
        ["config.MODEL.AMP_PARAMS.USE_AMP=True", 'config.MODEL.AMP_PARAMS.AMP_ARGS={"opt_level": "O1"}'],
        {"MODEL.AMP_PARAMS.USE_AMP": True, "MODEL.AMP_PARAMS.AMP_ARGS.opt_level": "O1"},
    ),
    (
        ['config.MODEL.AMP_PARAMS.AMP_ARGS={"opt_level": "O3", "keep_batchnorm_fp32": True, '
         '"master_weights": True, "loss_scale": "dynamic"}'],
        {"MODEL.AMP_PARAMS.AMP_ARGS.opt_level": "O3", "MODEL.AMP_PARAMS.AMP_ARGS.keep_batchnorm_fp32": True},
    ),
    (
        ["config.OPTIMIZER.use_larc=True", "config.OPTIMIZER.larc_config.clip=False",
         "config.OPTIMIZER.larc_config.eps=1e-08", "config.OPTIMIZER.larc_config.trust_coefficient=0.001"],
        {"OPTIMIZER.larc_config.eps": 1e-8, "OPTIMIZER.larc_config.clip": False},
    ),
    (
        ["config.LOSS.swav_loss.temperature=0.2", "config.LOSS.swav_loss.epsilon=0.04"],
        {"LOSS.swav_loss.temperature": 0.2, "LOSS.swav_loss.epsilon": 0.04},
    ),
    (["+config/pretrain/swav/models=resnet101"], {"MODEL.TRUNK.RESNETS.DEPTH": 101}),
    (
        ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"],
        {"MODEL.TRUNK.RESNETS.DEPTH": 101},
    ),
    (
        ["+config/pretrain/swav/transforms=multicrop_2x224_4x96"],
        {"LOSS.swav_loss.num_crops": 6, "DATA.TRAIN.TRANSFORMS.0.size_crops": [224, 96]},
    ),
    (
        ['config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 2048, 2048, 128], "use_bn": True, "num_clusters": [3000]}]]'],
        {"MODEL.HEAD.PARAMS.0.1.dims": [2048, 2048, 2048, 128]},
    ),
    (["+config/pretrain/swav/heads=mlp_3layer"], {"MODEL.HEAD.PARAMS.0.1.dims": [2048, 2048, 2048, 128]}),
    (["+config/pretrain/swav/heads=mlp_4096_hidden"], {"MODEL.HEAD.PARAMS.0.1.dims": [2048, 4096, 128]}),
    (["config.OPTIMIZER.num_epochs=100"], {"OPTIMIZER.num_epochs": 100}),
    (
        ['config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 2048, 128], "use_bn": True, "num_clusters": [3000, 3000, 3000]}]]'],
        {"LOSS.swav_loss.num_prototypes": [3000, 3000, 3000]},
    ),
    (
        ["config.LOSS.swav_loss.queue.queue_length=3840", "config.LOSS.swav_loss.queue.start_iter=1000"],
        # 3840 is not a multiple of the global batch 4096: rounded down to none... so it is an error
        None,
    ),
]


@pytest.mark.parametrize("overrides,expected", GUIDE)
def test_guide_commands_compose(overrides, expected):
    if expected is None:
        with pytest.raises(ConfigError, match="smaller than the global batch 4096"):
            load_config([BASE, *overrides])
        return
    cfg = load_config([BASE, *overrides])
    for dotted, value in expected.items():
        assert OmegaConf.select(cfg, dotted) == value, dotted


def test_world_size_changes_the_learning_rate():
    one = load_config([BASE, "config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"])
    assert one.OPTIMIZER.param_schedulers.lr.scaled.base_value == pytest.approx(0.3 * 64 / 256)
    four = load_config([BASE, "config.DISTRIBUTED.NUM_NODES=4", "config.DISTRIBUTED.NUM_PROC_PER_NODE=8"])
    assert four.OPTIMIZER.param_schedulers.lr.scaled.base_value == pytest.approx(0.3 * 2048 / 256)
    assert four.OPTIMIZER.param_schedulers.lr.scaled.end_value == pytest.approx(0.0003 * 8)


def test_small_batch_recipe():
    cfg = load_config([BASE, "+config/pretrain/swav/optimization=small_batch_256"])
    lr = cfg.OPTIMIZER.param_schedulers.lr.scaled
    assert (lr.base_value, lr.end_value) == (pytest.approx(0.6), pytest.approx(0.0006))
    queue = cfg.LOSS.swav_loss.queue
    assert (queue.queue_length, queue.local_queue_length) == (3840, 960)


def test_queue_rounding_down_to_the_global_batch():
    cfg = load_config([BASE, "config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
                       "config.LOSS.swav_loss.queue.queue_length=4000"])
    assert cfg.LOSS.swav_loss.queue.queue_length == 3840  # 15 x 256
    assert cfg.LOSS.swav_loss.queue.local_queue_length == 960


def test_group_options_merge_in_command_line_order(tmp_path):
    a = load_config([BASE, "+config/pretrain/swav/heads=mlp_3layer", "+config/pretrain/swav/heads=mlp_4096_hidden"])
    b = load_config([BASE, "+config/pretrain/swav/heads=mlp_4096_hidden", "+config/pretrain/swav/heads=mlp_3layer"])
    assert list(a.MODEL.HEAD.PARAMS[0][1].dims) == [2048, 4096, 128]
    assert list(b.MODEL.HEAD.PARAMS[0][1].dims) == [2048, 2048, 2048, 128]
    # Key overrides win over group options wherever they stand (as in Hydra).
    c = load_config([BASE, "config.MODEL.TRUNK.RESNETS.DEPTH=152", "+config/pretrain/swav/models=resnet101"])
    assert c.MODEL.TRUNK.RESNETS.DEPTH == 152


def test_user_yaml_file_and_saved_config_round_trip(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("config:\n  OPTIMIZER:\n    num_epochs: 7\n  DATA:\n    TRAIN:\n      BATCHSIZE_PER_REPLICA: 32\n")
    cfg = load_config([f"config={mine}"])
    assert cfg.OPTIMIZER.num_epochs == 7 and cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 32
    # A resolved config given back reproduces itself: inference is idempotent.
    saved = tmp_path / "train_config.yaml"
    full = load_config([BASE, "config.LOSS.swav_loss.queue.queue_length=9000", "config.DISTRIBUTED.NUM_NODES=1"])
    saved.write_text(to_yaml(full))
    assert load_config([f"config={saved}"]) == full


@pytest.mark.parametrize(
    "override,message",
    [
        ("config.OPTIMIZER.num_epoch=3", "unknown key config.OPTIMIZER.num_epoch. Did you mean 'num_epochs'"),
        ("config.LOSS.swav_loss.temprature=0.2", "Did you mean 'temperature'"),
        ("config.optimizer.name=sgd", "Did you mean 'OPTIMIZER'"),
        ("config.OPTIMIZER.num_epochs=abc", "config.OPTIMIZER.num_epochs must be int"),
        ("config.OPTIMIZER.use_larc=yes please", "must be bool"),
        ("config=pretrain/swav/swav_8node_resnt", "Did you mean: pretrain/swav/swav_8node_resnet"),
        ("+config/pretrain/swav/models=resnet10", "no such group option. Did you mean: resnet101?"),
        ("config.MODEL.TRUNK.RESNETS.DEPTH=77", "DEPTH=77 is not one of"),
        ("OPTIMIZER.num_epochs=3", "must start with 'config.'"),
        ('config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 128]}]]', "swav_head"),
        ("config.LOSS.swav_loss.crops_for_assign=[0, 9]", "crop index below num_crops=8"),
    ],
)
def test_config_errors_name_the_key(override, message):
    args = [override] if override.startswith("config=") else [BASE, override]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(args)


def test_transform_crop_counts_must_agree():
    with pytest.raises(ConfigError, match="total_num_crops=6 but num_crops"):
        load_config(['config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 6, '
                     '"num_crops": [2, 2], "size_crops": [32, 16], "crop_scales": [[0.3, 1], [0.1, 0.3]]}]'])


def test_values_parse_like_the_guide_writes_them():
    assert parse_value("False") is False and parse_value("True") is True
    assert parse_value('[["swav_head", {"dims": [10444, 10444, 128], "use_bn": False}]]') == [
        ["swav_head", {"dims": [10444, 10444, 128], "use_bn": False}]
    ]


def test_every_packaged_config_composes_and_builds():
    import torch

    from swav.build import build_model
    from swav.data import build_transforms

    for name in available_configs():
        if "/" in name and name.rsplit("/", 2)[-2] in ("models", "transforms", "heads", "optimization"):
            group, option = name.rsplit("/", 1)
            cfg = load_config([BASE, f"+config/{group}={option}"])
        else:
            cfg = load_config([f"config={name}"])
        transform = build_transforms(OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS))
        loss = cfg.LOSS[cfg.LOSS.name]  # the method's own section holds the inferred shapes
        assert len(transform.size_crops_per_crop) == loss.num_crops
        with torch.device("meta"):  # shapes only: no memory for the big trunks
            model = build_model(cfg)
        if "num_prototypes" in loss:  # SwAV's, inferred from the head; the other methods' files test theirs
            assert [p.shape[0] for p in model.prototype_weights()] == list(loss.num_prototypes), name


def test_infer_is_pure():
    raw = compose([BASE])
    before = OmegaConf.create(raw)
    infer(raw)
    assert OmegaConf.create(raw) == before


def test_crops_too_small_for_the_trunk_are_refused():
    # 16-px crops reach the last stage of a standard-stem ResNet as 1x1 maps.
    crops = ('config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 6, '
             '"num_crops": [2, 4], "size_crops": [32, 16], "crop_scales": [[0.3, 1], [0.1, 0.3]]}, {"name": "ToTensor"}]')
    with pytest.raises(ConfigError, match="crop size 16 is too small.*SMALL_STEM"):
        load_config([crops, "config.MODEL.TRUNK.RESNETS.SMALL_STEM=false"])
    load_config([crops, "config.MODEL.TRUNK.RESNETS.SMALL_STEM=true"])
    # A stride-2 small stem halves every map: 16 px still reaches the last stage as 2x2, 8 px not.
    stride2 = ["config.MODEL.TRUNK.RESNETS.SMALL_STEM=true", "config.MODEL.TRUNK.RESNETS.SMALL_STEM_STRIDE=2"]
    load_config([crops, *stride2])
    with pytest.raises(ConfigError, match="crop size 8 is too small.*at least 16 px"):
        load_config([crops.replace("[32, 16]", "[32, 8]"), *stride2])


def test_stem_stride_needs_the_small_stem_and_width_must_give_whole_channels():
    with pytest.raises(ConfigError, match="SMALL_STEM_STRIDE=2 applies to the small 3x3 stem only"):
        load_config(["config.MODEL.TRUNK.RESNETS.SMALL_STEM_STRIDE=2"])
    with pytest.raises(ConfigError, match="SMALL_STEM_STRIDE"):
        load_config(["config.MODEL.TRUNK.RESNETS.SMALL_STEM=true", "config.MODEL.TRUNK.RESNETS.SMALL_STEM_STRIDE=3"])
    with pytest.raises(ConfigError, match="WIDTH_MULTIPLIER=0.3: the stem has 64 x WIDTH_MULTIPLIER channels"):
        load_config(["config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.3"])
    with pytest.raises(ConfigError, match="WIDTH_MULTIPLIER"):
        load_config(["config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0"])
    cfg = load_config([
        "config.MODEL.TRUNK.RESNETS.DEPTH=18", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.5",
        'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [256, 64, 16], "num_clusters": [10]}]]',
    ])
    assert cfg.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER == 0.5


def test_learning_rate_of_swav_8node_resnet_at_key_iterations():
    from swav.build import build_lr_schedule

    cfg = load_config([BASE])
    iters_per_epoch = 313  # ImageNet-1k at batch 4096
    lr = build_lr_schedule(cfg, iters_per_epoch)
    assert len(lr) == 400 * 313
    assert lr[0] == pytest.approx(0.0)
    assert lr[3129] < 4.8 and lr[3130] == pytest.approx(4.8)  # 10 warm-up epochs
    assert lr[-1] == pytest.approx(0.0048)
    assert (np.diff(lr[3130:]) <= 0).all()
    # Halfway through the cosine: the mean of peak and end.
    middle = 3130 + (len(lr) - 3130 - 1) // 2
    assert lr[middle] == pytest.approx((4.8 + 0.0048) / 2, rel=1e-3)


def test_multistep_and_constant_schedules_follow_warm_up():
    from swav.build import build_lr_schedule

    cfg = load_config(["config.OPTIMIZER.param_schedulers.lr.name=multistep", "config.OPTIMIZER.num_epochs=6",
                       "config.OPTIMIZER.param_schedulers.lr.milestones=[3, 5]",
                       "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=256"])
    lr = build_lr_schedule(cfg, 10)
    assert len(lr) == 60
    assert lr[0] == 0.0 and lr[10] == pytest.approx(0.3)
    assert lr[29] == pytest.approx(0.3) and lr[30] == pytest.approx(0.03) and lr[50] == pytest.approx(0.003)
    cfg = load_config(["config.OPTIMIZER.param_schedulers.lr.name=constant", "config.OPTIMIZER.num_epochs=3",
                       "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=256"])
    lr = build_lr_schedule(cfg, 10)
    assert len(lr) == 30 and lr[9] < 0.3 and all(v == pytest.approx(0.3) for v in lr[10:])


# ----------------------------------------------------------------------------------------------
# Values that used to crash late (a ZeroDivisionError after the first epoch, a launcher that
# starts -1 processes) are refused by load_config, naming the key and its valid range.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("config.CHECKPOINT.CHECKPOINT_FREQUENCY=0",
         "config.CHECKPOINT.CHECKPOINT_FREQUENCY=0: must be an integer >= 1 (epochs between checkpoints)"),
        ("config.LOG_FREQUENCY=0", "config.LOG_FREQUENCY=0: must be an integer >= 1 (iterations between log lines)"),
        ("config.DATA.NUM_DATALOADER_WORKERS=-1", "config.DATA.NUM_DATALOADER_WORKERS=-1: must be an integer in [0, 256]"),
        ("config.SEED_VALUE=-1", "config.SEED_VALUE=-1: must be an integer in [0, 4294967295]"),
        ("config.OPTIMIZER.num_epochs=0", "config.OPTIMIZER.num_epochs=0: must be an integer in [1, 100000]"),
        ("config.DISTRIBUTED.NUM_NODES=0", "config.DISTRIBUTED.NUM_NODES=0: must be an integer in [1, 100000]"),
        ("config.DISTRIBUTED.NODE_ID=-1", "config.DISTRIBUTED.NODE_ID=-1: must be an integer >= 0"),
        ("config.DISTRIBUTED.NODE_ID=1", "config.DISTRIBUTED.NODE_ID=1: must be an integer in [0, NUM_NODES - 1] = [0, 0]"),
        ("config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=0",
         "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=0: must be -1 or an integer >= 1 (iterations between extra checkpoints; -1: off)"),
        ("config.LOSS.swav_loss.temperature=0", "config.LOSS.swav_loss.temperature=0.0: must be a number > 0"),
        ("config.OPTIMIZER.momentum=1.0", "config.OPTIMIZER.momentum=1.0: must be a number in [0, 1)"),
        ("config.DATA.TRAIN.DATA_LIMIT=0", "config.DATA.TRAIN.DATA_LIMIT=0: must be -1 or an integer >= 1"),
        ("config.DATA.SYNTHETIC.NUM_CLASSES=11", "config.DATA.SYNTHETIC.NUM_CLASSES=11: must be an integer in [2, 10]"),
        ("config.EVAL.KNN.K=[20, 0]", "config.EVAL.KNN.K[1]=0: must be an integer >= 1 (neighbours that vote)"),
        ("config.EVAL.SVM.CV_FOLDS=1", "config.EVAL.SVM.CV_FOLDS=1: must be an integer >= 2"),
        ("config.LOG_FREQUENCY=null", "config.LOG_FREQUENCY=None: must be an integer >= 1"),
        ('config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 0, 128], "num_clusters": [3000]}]]',
         "config.MODEL.HEAD.PARAMS: swav_head dims[1]=0: must be an integer in [1, 131072]"),
        ('config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 2048, 128], "num_clusters": [-5]}]]',
         "config.MODEL.HEAD.PARAMS: swav_head num_clusters[0]=-5: must be an integer in [1, 131072]"),
        ("config.MODEL.TRUNK.RESNETS.GROUPS=32", "ResNet-18 has basic blocks, which need GROUPS=1 and WIDTH_PER_GROUP=64"),
        ("config.OPTIMIZER.nesterov=true", None),  # momentum 0.9: fine
        ("config.LOSS.swav_loss.crops_for_assign=[1, 1]", "each entry must be a different crop index"),
    ],
)
def test_out_of_range_values_are_config_errors(override, message):
    args = ["config.MODEL.TRUNK.RESNETS.DEPTH=18"] if "GROUPS" in override else []
    if message is None:
        load_config([*args, override])
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([*args, override])


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match=r"nesterov=true needs config.OPTIMIZER.momentum > 0"):
        load_config(["config.OPTIMIZER.nesterov=true", "config.OPTIMIZER.momentum=0"])


CROPS = ('{"name": "ImgPilToMultiCrop", "total_num_crops": 2, "num_crops": [2], "size_crops": [%s], '
         '"crop_scales": [%s]}')


@pytest.mark.parametrize(
    "transforms,message",
    [
        (f"[{CROPS % ('32', '[0.3, 1.5]')}]", "ImgPilToMultiCrop crop_scales[0][1]=1.5: must be a number in (0, 1]"),
        (f"[{CROPS % ('32', '[0.0, 1.0]')}]", "ImgPilToMultiCrop crop_scales[0][0]=0.0: must be a number in (0, 1]"),
        (f"[{CROPS % ('32', '[0.8, 0.3]')}]", "ImgPilToMultiCrop crop_scales entry [0.8, 0.3] must be [low, high] with low <= high"),
        (f"[{CROPS % ('0', '[0.3, 1.0]')}]", "ImgPilToMultiCrop size_crops[0]=0: must be an integer in [1, 4096]"),
        (f"[{CROPS % ('32', '[0.3, 1.0]')}, " '{"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 3.0, "radius_max": 2.0}]',
         "ImgPilGaussianBlur radius_min=3.0 is larger than radius_max=2.0"),
        (f"[{CROPS % ('32', '[0.3, 1.0]')}, " '{"name": "RandomHorizontalFlip", "p": 2.0}]',
         "RandomHorizontalFlip p=2.0: must be a number in [0, 1] (probability)"),
        (f"[{CROPS % ('32', '[0.3, 1.0]')}, " '{"name": "ToTensor"}, {"name": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}]',
         "Normalize std[1]=0.0: must be a number in (0, 1]"),
    ],
)
def test_transform_values_out_of_range_are_config_errors(transforms, message):
    with pytest.raises(ConfigError, match=re.escape(f"config.DATA.TRAIN.TRANSFORMS: {message}")):
        load_config([f"config.DATA.TRAIN.TRANSFORMS={transforms}"])


@pytest.mark.parametrize("procs", [0, -1])
def test_swav_train_with_no_processes_is_a_config_error(procs, tmp_path, capsys):
    from swav.cli import main

    run = tmp_path / "run"
    code = main(["train", f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}", f"config.CHECKPOINT.DIR={run}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"swav: config error: config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}: must be an integer in [1, 1024]")
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()  # refused before anything is written


def test_every_range_names_a_key_of_the_defaults():
    from swav.config.compose import package_config_dir, read_yaml
    from swav.config.infer import HEAD_RANGES, RANGES, TRANSFORM_RANGES, _entries

    defaults = read_yaml(package_config_dir() / "defaults.yaml")
    # An entry for a list key names a list; the defaults may hold it empty (milestones: []).
    missing = [path for path in RANGES if not _entries(defaults, path.replace("[]", ""))]
    assert not missing
    assert set(TRANSFORM_RANGES) == {"ImgPilToMultiCrop", "RandomHorizontalFlip", "ImgPilColorDistortion",
                                     "ImgPilGaussianBlur", "Normalize"}
    assert set(HEAD_RANGES) == {"dims[]", "num_clusters[]"}
    # The defaults themselves, and every packaged experiment, are within range.
    load_config([])
    for name in available_configs():
        if "/" not in name or name.rsplit("/", 2)[-2] not in ("models", "transforms", "heads", "optimization"):
            load_config([f"config={name}"])


def test_range_specs_read_as_written():
    from swav.config.infer import Range

    assert Range(int, ">= 1", "x").describe() == "an integer >= 1"
    assert Range(float, "[0, 1)", "x").describe() == "a number in [0, 1)"
    assert Range(int, "-1 or >= 1", "x").describe() == "-1 or an integer >= 1"
    momentum = Range(float, "[0, 1)", "x")
    assert momentum.admits(0) and momentum.admits(0.99) and not momentum.admits(1.0) and not momentum.admits(-0.1)
    positive = Range(float, "(0, 1]", "x")
    assert positive.admits(1) and not positive.admits(0.0)
    frequency = Range(int, "-1 or >= 1", "x")
    assert frequency.admits(-1) and frequency.admits(5) and not frequency.admits(0) and not frequency.admits(-2)
    assert not positive.admits(float("inf")) and not positive.admits(float("nan"))
    assert Range(int, "[1, 10]", "x").admits(10) and not Range(int, "[1, 10]", "x").admits(10**400)
    # Types: an int is a valid float; a float, a bool or None is not a valid int.
    assert not frequency.admits(2.0) and not frequency.admits(True) and not frequency.admits(None)
    with pytest.raises(ValueError, match="cannot read the range"):
        Range(int, "at least 1", "x").admits(1)


def test_launcher_process_counts_are_checked_like_the_config():
    from swav.distributed import DistEnv
    from swav.launch import config_for_launcher

    for world, local in ((4, 0), (6, 4)):
        with pytest.raises(ConfigError, match="give every node the same number of processes, at least one"):
            config_for_launcher([], DistEnv(world_size=world, local_world_size=local, launcher="torchrun"))
    cfg = config_for_launcher([], DistEnv(world_size=8, local_world_size=4, launcher="torchrun"))
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (2, 4)


def test_a_number_after_a_list_key_sets_one_entry():
    base = compose(["config=pretrain/simclr/simclr_cifar10_15min"])
    cfg = compose(["config=pretrain/simclr/simclr_cifar10_15min", "config.DATA.TRAIN.TRANSFORMS.2.strength=1",
                   "config.DATA.TRAIN.TRANSFORMS.0.crop_scales.0.0=0.3"])
    before, after = base["DATA"]["TRAIN"]["TRANSFORMS"], cfg["DATA"]["TRAIN"]["TRANSFORMS"]
    assert after[2] == {"name": "ImgPilColorDistortion", "strength": 1.0}
    assert isinstance(after[2]["strength"], float)
    assert after[0]["crop_scales"] == [[0.3, 1.0], *before[0]["crop_scales"][1:]]
    assert after[1:2] + after[3:] == before[1:2] + before[3:]
    assert before[2]["strength"] == 0.5  # the composed base is not changed in place


@pytest.mark.parametrize(("override", "message"), [
    ("TRANSFORMS.5.p=1", "is a list of 5 entries; pick one with a number from 0 to 4"),
    ("TRANSFORMS.first.p=1", "is a list of 5 entries"),
    ("TRANSFORMS.2.strenght=1", "unknown key config.DATA.TRAIN.TRANSFORMS.2.strenght. Did you mean 'strength'"),
    ("TRANSFORMS.2.strength=high", "TRANSFORMS.2.strength must be float"),
    ("TRANSFORMS.0.size_crops.0.x=1", "size_crops.0 is int 32, it has no entry 'x'"),
])
def test_a_list_entry_that_does_not_exist_is_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(["config=pretrain/simclr/simclr_cifar10_15min", f"config.DATA.TRAIN.{override}"])

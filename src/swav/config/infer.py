"""Every derived config value, computed in one visible place (STYLE.md 6).

`infer` is a pure function: it returns a new dict and can be applied to its own output (a
saved `train_config.yaml` re-infers to itself), because it only writes the keys marked
"inferred" in defaults.yaml and reads the user's values from the others.
"""

from __future__ import annotations

import copy
import logging

from swav.config.compose import ConfigError
from swav.models import (
    REGNET_KEYS,
    RESNET_ARCHS,
    SUPPORTED_TRUNKS,
    regnet_block_params,
    regnet_kwargs,
    trunk_num_features,
)

logger = logging.getLogger("swav")

RESNET_DEPTHS = tuple(sorted(RESNET_ARCHS))


def world_size_of(cfg: dict) -> int:
    dist = cfg["DISTRIBUTED"]
    return int(dist["NUM_NODES"]) * int(dist["NUM_PROC_PER_NODE"])


def multicrop_spec(cfg: dict) -> dict:
    transforms = cfg["DATA"]["TRAIN"]["TRANSFORMS"]
    if not transforms or transforms[0].get("name") != "ImgPilToMultiCrop":
        raise ConfigError("config.DATA.TRAIN.TRANSFORMS must start with {name: ImgPilToMultiCrop, ...}")
    spec = transforms[0]
    for key in ("total_num_crops", "num_crops", "size_crops", "crop_scales"):
        if key not in spec:
            raise ConfigError(f"config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop needs `{key}`")
    if not len(spec["num_crops"]) == len(spec["size_crops"]) == len(spec["crop_scales"]):
        raise ConfigError(
            "config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop num_crops, size_crops and crop_scales "
            "need one entry per crop resolution"
        )
    if sum(spec["num_crops"]) != spec["total_num_crops"]:
        raise ConfigError(
            f"config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop total_num_crops={spec['total_num_crops']}"
            f" but num_crops={list(spec['num_crops'])} sums to {sum(spec['num_crops'])}"
        )
    return spec


def swav_head_params(cfg: dict) -> dict:
    params = cfg["MODEL"]["HEAD"]["PARAMS"]
    if len(params) != 1 or len(params[0]) != 2 or params[0][0] != "swav_head":
        raise ConfigError(
            'config.MODEL.HEAD.PARAMS must be [["swav_head", {"dims": [...], "use_bn": true, '
            f'"num_clusters": [3000]}}]], got {params!r}'
        )
    head = dict(params[0][1])
    unknown = set(head) - {"dims", "use_bn", "num_clusters"}
    if unknown:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: swav_head does not take {sorted(unknown)}; it takes dims, use_bn, num_clusters"
        )
    if "dims" not in head or len(head["dims"]) < 1:
        raise ConfigError("config.MODEL.HEAD.PARAMS: swav_head needs `dims`, e.g. [2048, 2048, 128]")
    head.setdefault("use_bn", True)
    head.setdefault("num_clusters", [3000])
    return head


def _regnet_types(regnet: dict) -> None:
    ints = ("depth", "w_0", "group_width")
    for key in REGNET_KEYS:
        value = regnet[key]
        if value is None:
            continue
        ok = isinstance(value, int) if key in ints else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "an integer" if key in ints else "a number"
            raise ConfigError(f"config.MODEL.TRUNK.REGNET.{key} must be {kind}, got {value!r}")
    if not isinstance(regnet["stem_width"], int) or regnet["stem_width"] < 1:
        raise ConfigError(
            f"config.MODEL.TRUNK.REGNET.stem_width must be a positive integer, got {regnet['stem_width']!r}"
        )


def check_trunk(trunk: dict) -> None:
    """The trunk section names an architecture this package can build."""
    if trunk["NAME"] not in SUPPORTED_TRUNKS:
        raise ConfigError(
            f"config.MODEL.TRUNK.NAME={trunk['NAME']!r} is not available; supported: {', '.join(SUPPORTED_TRUNKS)}"
        )
    if trunk["NAME"] == "resnet":
        if trunk["RESNETS"]["DEPTH"] not in RESNET_DEPTHS:
            raise ConfigError(
                f"config.MODEL.TRUNK.RESNETS.DEPTH={trunk['RESNETS']['DEPTH']} is not one of {RESNET_DEPTHS}"
            )
        return
    _regnet_types(trunk["REGNET"])
    try:
        regnet_block_params(**regnet_kwargs({"MODEL": {"TRUNK": trunk}}))
    except ValueError as e:
        raise ConfigError(f"config.MODEL.TRUNK.REGNET: {e}") from None


def describe_trunk(trunk: dict) -> str:
    if trunk["NAME"] == "regnet":
        regnet = trunk["REGNET"]
        if regnet["name"]:
            return f"RegNet {regnet['name']}"
        return "RegNet " + ", ".join(f"{k}={regnet[k]}" for k in REGNET_KEYS if regnet[k] is not None)
    r = trunk["RESNETS"]
    text = f"ResNet-{r['DEPTH']}"
    if r["WIDTH_MULTIPLIER"] != 1:
        text += f"-w{r['WIDTH_MULTIPLIER']}"
    if r["GROUPS"] != 1:
        text += f" {r['GROUPS']}x{r['WIDTH_PER_GROUP']}d"
    return text


def infer(cfg: dict, world_size: int | None = None) -> dict:
    """Return a copy of `cfg` with every inferred key filled in and cross-key rules checked."""
    cfg = copy.deepcopy(cfg)
    world = world_size or world_size_of(cfg)
    data, loss, optim = cfg["DATA"], cfg["LOSS"]["swav_loss"], cfg["OPTIMIZER"]
    global_batch = int(data["TRAIN"]["BATCHSIZE_PER_REPLICA"]) * world
    if global_batch < 1:
        raise ConfigError("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA must be at least 1")

    sources, paths = data["TRAIN"]["DATA_SOURCES"], data["TRAIN"]["DATA_PATHS"]
    if len(sources) != len(paths):
        raise ConfigError(
            f"config.DATA.TRAIN.DATA_SOURCES has {len(sources)} entries but DATA_PATHS has {len(paths)}:"
            " give one source per path"
        )

    trunk = cfg["MODEL"]["TRUNK"]
    check_trunk(trunk)

    # The loss reads its shapes from the data and model sections, so they cannot disagree.
    crops = multicrop_spec(cfg)
    # A crop must still be at least 2x2 when it enters the last stage (both trunks stride 32 with
    # their standard stems): a 1x1 map there carries no spatial information, and oneDNN's
    # bfloat16 backward of a strided 3x3 conv on a 1x1 input returns garbage gradients
    # (torch 2.14 on CPU), which shows up as a NaN loss.
    small_stem = trunk["NAME"] == "resnet" and trunk["RESNETS"]["SMALL_STEM"]
    smallest = 8 if small_stem else 32
    too_small = [s for s in crops["size_crops"] if s < smallest]
    if too_small:
        hint = "" if small_stem or trunk["NAME"] != "resnet" else (
            ", or use MODEL.TRUNK.RESNETS.SMALL_STEM=true for small images"
        )
        raise ConfigError(
            f"config.DATA.TRAIN.TRANSFORMS: crop size {min(too_small)} is too small for this "
            f"{'ResNet' if trunk['NAME'] == 'resnet' else 'RegNet'} (at least {smallest} px{hint})"
        )
    head = swav_head_params(cfg)
    # Computed from the architecture's arithmetic, so checking a 10444-wide RegNet costs nothing.
    features = trunk_num_features(cfg)
    if int(head["dims"][0]) != features:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: swav_head dims[0]={head['dims'][0]} but the trunk "
            f"({describe_trunk(trunk)}) gives {features} features; set dims to [{features}, ...]"
        )
    loss["num_crops"] = int(crops["total_num_crops"])
    loss["embedding_dim"] = int(head["dims"][-1])
    loss["num_prototypes"] = [int(k) for k in head["num_clusters"]]
    if not loss["num_prototypes"]:
        raise ConfigError("config.MODEL.HEAD.PARAMS: swav_head needs at least one entry in num_clusters")
    if loss["num_crops"] < 2:
        raise ConfigError("SwAV needs at least 2 crops per image (ImgPilToMultiCrop.total_num_crops)")
    bad = [c for c in loss["crops_for_assign"] if not 0 <= c < loss["num_crops"]]
    if bad or not loss["crops_for_assign"]:
        raise ConfigError(
            f"config.LOSS.swav_loss.crops_for_assign={list(loss['crops_for_assign'])}: each entry must be a crop"
            f" index below num_crops={loss['num_crops']}"
        )
    if int(loss["temp_hard_assignment_iters"]) < -1:
        raise ConfigError(
            "config.LOSS.swav_loss.temp_hard_assignment_iters must be >= -1 "
            "(0: soft codes, N: hard for the first N iterations, -1: hard for the whole run)"
        )
    if int(loss["num_iters"]) < 1:
        raise ConfigError("config.LOSS.swav_loss.num_iters must be >= 1 (3 in the paper)")
    if not loss["output_dir"]:
        loss["output_dir"] = cfg["CHECKPOINT"]["DIR"]

    # The queue holds whole global batches, split evenly over the processes.
    queue = loss["queue"]
    length = int(queue["queue_length"])
    if length < 0:
        raise ConfigError("config.LOSS.swav_loss.queue.queue_length must be >= 0 (0 disables the queue)")
    if 0 < length < global_batch:
        raise ConfigError(
            f"config.LOSS.swav_loss.queue.queue_length={length} is smaller than the global batch {global_batch}:"
            f" set 0 to disable the queue or at least {global_batch}"
        )
    rounded = length - length % global_batch
    if rounded != length:
        logger.info("queue_length %d rounded down to %d, a multiple of the global batch %d", length, rounded, global_batch)
    queue["queue_length"] = rounded
    queue["local_queue_length"] = rounded // world

    # Linear scaling rule: every LR value is given per base_lr_batch_size images (DESIGN 8).
    lr = optim["param_schedulers"]["lr"]
    if lr["name"] not in ("cosine", "multistep", "constant"):
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.lr.name={lr['name']!r}: use cosine, multistep or constant"
        )
    scaling = lr["auto_lr_scaling"]
    factor = global_batch / float(scaling["base_lr_batch_size"]) if scaling["auto_scale"] else 1.0
    scaling["scale_factor"] = factor
    lr["scaled"] = {k: lr[k] * factor for k in ("warmup_start_value", "base_value", "end_value")}
    if lr["warmup_epochs"] > optim["num_epochs"]:
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.lr.warmup_epochs={lr['warmup_epochs']} is longer than"
            f" num_epochs={optim['num_epochs']}"
        )
    if optim["name"] != "sgd":
        raise ConfigError(f"config.OPTIMIZER.name={optim['name']!r}: only sgd is available")

    amp = cfg["MODEL"]["AMP_PARAMS"]
    if amp["AMP_TYPE"] not in ("bfloat16", "float16"):
        raise ConfigError(f"config.MODEL.AMP_PARAMS.AMP_TYPE={amp['AMP_TYPE']!r}: use bfloat16 or float16")
    if amp["CPU_BFLOAT16"] not in ("auto", "always", "never"):
        raise ConfigError(f"config.MODEL.AMP_PARAMS.CPU_BFLOAT16={amp['CPU_BFLOAT16']!r}: use auto, always or never")
    if cfg["MODEL"]["SYNC_BN_CONFIG"]["SYNC_BN_TYPE"] not in ("pytorch", "apex"):
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE must be pytorch or apex")
    if cfg["MACHINE"]["DEVICE"] not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"config.MACHINE.DEVICE={cfg['MACHINE']['DEVICE']!r}: use auto, cpu or cuda")
    for entry in cfg["MODEL"]["TEMP_FROZEN_PARAMS_ITER_MAP"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int)):
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP entries are [name, iterations], got {entry!r}"
            )
        if entry[1] < -1:
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP: {entry!r} needs iterations >= -1 "
                "(-1: frozen for the whole run, e.g. fixed random prototypes)"
            )
    return cfg

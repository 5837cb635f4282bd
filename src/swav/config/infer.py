"""Every derived config value, computed in one visible place, and every value checked first.

`infer` is a pure function: it returns a new dict and can be applied to its own output (a
saved `train_config.yaml` re-infers to itself), because it only writes the keys marked
"inferred" in defaults.yaml and reads the user's values from the others.

Before inferring anything it checks each number against its valid range (the RANGES tables
below), so that a value which would crash hours into a run (a zero frequency, a negative
worker count) is refused by `load_config`, before anything is written. The checks between keys
follow, each in its own `check_*` function; `derive` then writes every inferred key.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swav.config.compose import ConfigError, package_config_dir, read_yaml
from swav.models import (
    REGNET_KEYS,
    RESNET_ARCHS,
    SUPPORTED_TRUNKS,
    regnet_block_params,
    regnet_kwargs,
    trunk_width,
)

logger = logging.getLogger("swav")

RESNET_DEPTHS = tuple(sorted(RESNET_ARCHS))
BASIC_BLOCK_DEPTHS = (18, 34)  # torchvision's BasicBlock has no groups or group width


# ----------------------------------------------------------------------------------------------
# Valid ranges, as data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The valid values of one number, written the way the error message says them.

    `spec` is one or more alternatives joined by " or ": an interval "[0, 1)", a bound ">= 1"
    or "> 0", or a single special value "-1" (a value that means something, like "off").
    """

    kind: type  # int or float (an int is a valid float)
    spec: str
    what: str  # what the number is, so the message says why the range is what it is

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        # inf and nan satisfy no range a run can use (nan compares false, inf is "> 0").
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return any(accepts(value) for accepts in _alternatives(self.spec))

    def describe(self) -> str:
        parts = self.spec.split(" or ")
        special = [p for p in parts if _NUMBER.fullmatch(p)]
        ranges = [f"in {p}" if p[0] in "[(" else p for p in parts if not _NUMBER.fullmatch(p)]
        text = f"{'an integer' if self.kind is int else 'a number'} {' or '.join(ranges)}"
        return " or ".join([*special, text]) if special else text


_NUMBER = re.compile(r"-?\d+(\.\d*)?(e[-+]?\d+)?")
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")
_BOUND = re.compile(r"(>=|>|<=|<) (\S+)")
# Operators, not float methods: an integer too large for a float still compares exactly.
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@functools.cache
def _alternatives(spec: str) -> tuple[Callable[[float], bool], ...]:
    """The spec's alternatives as predicates (parsed once per spec)."""
    tests = []
    for part in spec.split(" or "):
        if interval := _INTERVAL.fullmatch(part):
            opening, low, high, closing = interval.groups()
            lo, hi = float(low), float(high)
            tests.append(lambda v, lo=lo, hi=hi, lo_open=opening == "(", hi_open=closing == ")":
                         (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi))
        elif bound := _BOUND.fullmatch(part):
            compare, limit = _COMPARE[bound[1]], float(bound[2])
            tests.append(lambda v, compare=compare, limit=limit: compare(v, limit))
        elif _NUMBER.fullmatch(part):
            tests.append(lambda v, special=float(part): v == special)
        else:
            raise ValueError(f"cannot read the range {spec!r}")
    return tuple(tests)


# Upper bounds are generous: far above any real run, low enough that a typo (1e9 for 1e3)
# is refused here instead of allocating memory or looping for days. Learning rates have none:
# too large a rate makes the loss NaN within a few steps, and training stops with that advice.
MAX_EPOCHS = 100_000
MAX_IMAGE_SIDE = 4096
MAX_WIDTH = 2**17  # head widths and prototypes: the guide's widest is 10444, the paper's most prototypes 100000
MAX_SYNTHETIC_IMAGES = 10_000_000  # drawn on the fly, but their labels are kept in memory

# Key path -> valid range. `KEY[]` is every entry of the list KEY. A key that is absent from
# the config is skipped, so a table entry can precede the key in defaults.yaml.
RANGES: dict[str, Range] = {
    # Numpy needs non-negative seeds, and scikit-learn (the SVMs) 32-bit ones.
    "SEED_VALUE": Range(int, f"[0, {2**32 - 1}]", "seeds weight init, data order and augmentations"),
    "LOG_FREQUENCY": Range(int, ">= 1", "iterations between log lines"),
    "DATA.NUM_DATALOADER_WORKERS": Range(int, "[0, 256]", "loader processes per training process; 0: none"),
    "DATA.MAX_MISSING_FRACTION": Range(float, "[0, 1]", "fraction of listed files that may be missing"),
    "DATA.TRAIN.DATA_LIMIT": Range(int, "-1 or >= 1", "use only the first N images; -1: all"),
    "DATA.TRAIN.BATCHSIZE_PER_REPLICA": Range(int, ">= 1", "images per process per iteration"),
    "DATA.TEST.DATA_LIMIT": Range(int, "-1 or >= 1", "use only the first N images; -1: all"),
    "DATA.SYNTHETIC.NUM_IMAGES_TRAIN": Range(int, f"[1, {MAX_SYNTHETIC_IMAGES}]", "images in the synthetic train split"),
    "DATA.SYNTHETIC.NUM_IMAGES_TEST": Range(int, f"[1, {MAX_SYNTHETIC_IMAGES}]", "images in the synthetic test split"),
    "DATA.SYNTHETIC.IMAGE_SIZE": Range(int, f"[8, {MAX_IMAGE_SIDE}]", "side of the synthetic images in pixels"),
    "DATA.SYNTHETIC.NUM_CLASSES": Range(int, "[2, 10]", "shape classes; the synthetic data has 10"),
    "MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER": Range(float, "(0, 64]", "scales every ResNet width; the paper's widest is 5"),
    "MODEL.TRUNK.RESNETS.SMALL_STEM_STRIDE": Range(int, "[1, 2]", "stride of the small 3x3 stem"),
    "MODEL.TRUNK.RESNETS.GROUPS": Range(int, "[1, 1024]", "ResNeXt cardinality; 1: ResNet"),
    "MODEL.TRUNK.RESNETS.WIDTH_PER_GROUP": Range(int, "[1, 1024]", "ResNeXt group width; 64: ResNet"),
    "MODEL.TRUNK.REGNET.stem_width": Range(int, "[1, 1024]", "channels of the RegNet stem"),
    "MODEL.SYNC_BN_CONFIG.GROUP_SIZE": Range(int, ">= -1", "-1: sync within a node, 0: all processes, N: groups of N"),
    "LOSS.swav_loss.temperature": Range(float, "> 0", "softmax temperature"),
    "LOSS.swav_loss.num_iters": Range(int, "[1, 1000]", "Sinkhorn iterations; 3 in the paper"),
    "LOSS.swav_loss.epsilon": Range(float, "> 0", "Sinkhorn entropic regularisation"),
    "LOSS.swav_loss.temp_hard_assignment_iters": Range(
        int, ">= -1", "0: soft codes, N: hard for the first N iterations, -1: hard for the whole run"),
    "LOSS.swav_loss.queue.queue_length": Range(int, "[0, 1000000]", "embeddings kept from past batches; 0: no queue"),
    "LOSS.swav_loss.queue.start_iter": Range(int, ">= 0", "first iteration that uses the queue"),
    "LOSS.simclr_info_nce_loss.temperature": Range(float, "> 0", "softmax temperature of the contrastive loss"),
    "LOSS.deepclusterv2_loss.temperature": Range(float, "> 0", "softmax temperature of the classification"),
    "LOSS.deepclusterv2_loss.num_clusters[]": Range(int, f"[1, {MAX_WIDTH}]", "k-means clusters per head"),
    "LOSS.deepclusterv2_loss.kmeans_iters": Range(int, "[1, 1000]", "k-means rounds per assignment phase"),
    "LOSS.sela_v2_loss.temperature": Range(float, "> 0", "softmax temperature of the classification"),
    "LOSS.sela_v2_loss.epsilon": Range(float, "> 0", "Sinkhorn entropic regularisation"),
    "LOSS.sela_v2_loss.num_iters": Range(int, "[1, 1000]", "Sinkhorn iterations over the memory bank"),
    "OPTIMIZER.momentum": Range(float, "[0, 1)", "SGD momentum"),
    "OPTIMIZER.weight_decay": Range(float, "[0, 1]", "L2 penalty on every parameter; the paper's is 1e-6"),
    "OPTIMIZER.larc_config.eps": Range(float, "> 0", "keeps LARC's rate finite for zero gradients"),
    "OPTIMIZER.larc_config.trust_coefficient": Range(float, "> 0", "LARC's trust coefficient"),
    "OPTIMIZER.num_epochs": Range(int, f"[1, {MAX_EPOCHS}]", "training epochs"),
    "OPTIMIZER.param_schedulers.lr.warmup_start_value": Range(float, ">= 0", "LR per base_lr_batch_size images"),
    "OPTIMIZER.param_schedulers.lr.base_value": Range(float, ">= 0", "LR per base_lr_batch_size images"),
    "OPTIMIZER.param_schedulers.lr.end_value": Range(float, ">= 0", "LR per base_lr_batch_size images"),
    "OPTIMIZER.param_schedulers.lr.warmup_epochs": Range(int, ">= 0", "epochs of linear warm-up"),
    "OPTIMIZER.param_schedulers.lr.milestones[]": Range(int, ">= 0", "epochs where the LR is multiplied by gamma"),
    "OPTIMIZER.param_schedulers.lr.gamma": Range(float, "(0, 1]", "factor on the LR at each milestone"),
    "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size": Range(int, ">= 1", "images the LR values are given for"),
    "DISTRIBUTED.NUM_NODES": Range(int, "[1, 100000]", "machines"),
    "DISTRIBUTED.NUM_PROC_PER_NODE": Range(int, "[1, 1024]", "training processes per machine"),
    "DISTRIBUTED.NODE_ID": Range(int, ">= 0", "this machine's index"),
    "CHECKPOINT.CHECKPOINT_FREQUENCY": Range(int, ">= 1", "epochs between checkpoints"),
    "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY": Range(int, "-1 or >= 1", "iterations between extra checkpoints; -1: off"),
    "KNN_MONITOR.EPOCH_FREQUENCY": Range(int, ">= 0", "epochs between kNN scores; 0: only after training"),
    "KNN_MONITOR.IMAGE_SIZE": Range(int, f"[8, {MAX_IMAGE_SIDE}]", "evaluation crop side in pixels"),
    "KNN_MONITOR.K": Range(int, ">= 1", "neighbours that vote"),
    "KNN_MONITOR.TEMPERATURE": Range(float, "> 0", "votes are weighted by exp(cosine / T)"),
    "EVAL.IMAGE_SIZE": Range(int, f"[8, {MAX_IMAGE_SIDE}]", "evaluation crop side in pixels"),
    "EVAL.BATCH_SIZE": Range(int, ">= 1", "images per forward pass"),
    "EVAL.MEAN[]": Range(float, "[0, 1]", "channel means of images scaled to [0, 1]"),
    "EVAL.STD[]": Range(float, "(0, 1]", "channel standard deviations of images scaled to [0, 1]"),
    "EVAL.FEATURES.POOL_SIZE": Range(int, "[1, 64]", "side of the pooled feature map"),
    "EVAL.KNN.K[]": Range(int, ">= 1", "neighbours that vote"),
    "EVAL.KNN.TEMPERATURE": Range(float, "> 0", "votes are weighted by exp(cosine / T)"),
    "EVAL.LINEAR.NUM_EPOCHS": Range(int, f"[1, {MAX_EPOCHS}]", "epochs of the linear classifier"),
    "EVAL.LINEAR.BATCH_SIZE": Range(int, ">= 1", "images per step"),
    "EVAL.LINEAR.LR": Range(float, ">= 0", "learning rate"),
    "EVAL.LINEAR.STEP_DECAYS": Range(int, "[0, 10]", "divisions of the LR by 10"),
    "EVAL.LINEAR.WEIGHT_DECAY": Range(float, "[0, 1]", "L2 penalty"),
    "EVAL.LINEAR.MOMENTUM": Range(float, "[0, 1)", "SGD momentum"),
    "EVAL.SEMISUP.PERCENT": Range(float, "(0, 100]", "labelled share of each class, in percent"),
    "EVAL.SEMISUP.NUM_EPOCHS": Range(int, f"[1, {MAX_EPOCHS}]", "fine-tuning epochs"),
    "EVAL.SEMISUP.BATCH_SIZE": Range(int, ">= 1", "images per step"),
    "EVAL.SEMISUP.TRUNK_LR": Range(float, ">= 0", "learning rate of the trunk"),
    "EVAL.SEMISUP.HEAD_LR": Range(float, ">= 0", "learning rate of the classifier"),
    "EVAL.SEMISUP.LR_MILESTONES[]": Range(int, ">= 0", "epochs where both LRs are multiplied by LR_GAMMA"),
    "EVAL.SEMISUP.LR_GAMMA": Range(float, "(0, 1]", "factor on the LRs at each milestone"),
    "EVAL.SEMISUP.MOMENTUM": Range(float, "[0, 1)", "SGD momentum"),
    "EVAL.SEMISUP.WEIGHT_DECAY": Range(float, "[0, 1]", "L2 penalty"),
    # LIBLINEAR does not converge for huge costs: each fit then runs all MAX_ITER iterations.
    "EVAL.SVM.COSTS[]": Range(float, "(0, 1000000]", "LIBLINEAR costs C"),
    "EVAL.SVM.CV_FOLDS": Range(int, ">= 2", "cross-validation folds"),
    "EVAL.SVM.MAX_ITER": Range(int, f"[1, {2**31 - 1}]", "LIBLINEAR iterations per fit (a C int)"),
    "EVAL.SVM.LOW_SHOT[]": Range(int, ">= 1", "positives per class"),
}

# The same for the arguments of each transform in DATA.TRAIN.TRANSFORMS ...
TRANSFORM_RANGES: dict[str, dict[str, Range]] = {
    "ImgPilToMultiCrop": {
        "total_num_crops": Range(int, ">= 2", "SwAV predicts the code of one crop from another"),
        "num_crops[]": Range(int, ">= 0", "crops per resolution"),
        "size_crops[]": Range(int, f"[1, {MAX_IMAGE_SIDE}]", "crop side in pixels"),
        "crop_scales[][]": Range(float, "(0, 1]", "share of the image area a crop covers"),
    },
    "RandomHorizontalFlip": {"p": Range(float, "[0, 1]", "probability")},
    "ImgPilColorDistortion": {"strength": Range(float, "[0, 2.5]", "jitter strength; the hue shift 0.2 x strength stays within 0.5")},
    "ImgPilGaussianBlur": {
        "p": Range(float, "[0, 1]", "probability"),
        "radius_min": Range(float, "[0, 100]", "blur standard deviation in pixels"),
        "radius_max": Range(float, "[0, 100]", "blur standard deviation in pixels"),
    },
    "Normalize": {
        "mean[]": Range(float, "[0, 1]", "channel means of images scaled to [0, 1]"),
        "std[]": Range(float, "(0, 1]", "channel standard deviations of images scaled to [0, 1]"),
    },
}

# ... and of the head in MODEL.HEAD.PARAMS.
HEAD_RANGES: dict[str, Range] = {
    "dims[]": Range(int, f"[1, {MAX_WIDTH}]", "layer widths: trunk features, hidden layers, embedding"),
    "num_clusters[]": Range(int, f"[1, {MAX_WIDTH}]", "prototypes per set"),
}


def _entries(tree: Any, path: str) -> list[tuple[str, Any]]:
    """(name, value) of each value `path` names in `tree`, e.g. ("EVAL.KNN.K[1]", 200).

    `key[]` stands for every entry of the list at `key`. An absent key, or a value that should
    be a list and is not, gives nothing: the shape is checked where the value is used.
    """
    found: list[tuple[str, Any]] = [("", tree)]
    for part in path.split("."):
        key, depth = part.rstrip("[]"), part.count("[]")
        level = [(f"{name}.{key}" if name else key, node[key])
                 for name, node in found if isinstance(node, dict) and key in node]
        for _ in range(depth):
            level = [(f"{name}[{i}]", item) for name, node in level if isinstance(node, list)
                     for i, item in enumerate(node)]
        found = level
    return found


def check_ranges(tree: dict, table: dict[str, Range], prefix: str = "config.") -> None:
    """Refuse the first value of `tree` outside its range in `table`, naming key and range."""
    for path, valid in table.items():
        for name, value in _entries(tree, path):
            if not valid.admits(value):
                raise ConfigError(f"{prefix}{name}={value!r}: must be {valid.describe()} ({valid.what})")


# ----------------------------------------------------------------------------------------------
# Sections with their own structure: transforms, head, trunk
# ----------------------------------------------------------------------------------------------


def world_size_of(cfg: dict) -> int:
    dist = cfg["DISTRIBUTED"]
    return int(dist["NUM_NODES"]) * int(dist["NUM_PROC_PER_NODE"])


def check_transforms(transforms: list) -> None:
    """Each transform's numbers in range, and the pairs that must be ordered, ordered.

    The order and names of the transforms are checked where the data pipeline builds them.
    """
    where = "config.DATA.TRAIN.TRANSFORMS"
    if not all(isinstance(t, dict) for t in transforms):
        raise ConfigError(f"{where} must be a list of {{name: ..., arguments...}} entries")
    for spec in transforms:
        name = spec.get("name")
        check_ranges(spec, TRANSFORM_RANGES.get(name, {}), prefix=f"{where}: {name} ")
        if name == "ImgPilGaussianBlur" and spec.get("radius_min", 0.1) > spec.get("radius_max", 2.0):
            raise ConfigError(
                f"{where}: ImgPilGaussianBlur radius_min={spec['radius_min']} is larger than radius_max={spec['radius_max']}"
            )
    for scale in transforms[0]["crop_scales"]:
        if not (isinstance(scale, list) and len(scale) == 2 and scale[0] <= scale[1]):
            raise ConfigError(
                f"{where}: ImgPilToMultiCrop crop_scales entry {scale!r} must be [low, high] with low <= high"
            )


def multicrop_spec(cfg: dict) -> dict:
    transforms = cfg["DATA"]["TRAIN"]["TRANSFORMS"]
    if not transforms or not isinstance(transforms[0], dict) or transforms[0].get("name") != "ImgPilToMultiCrop":
        raise ConfigError("config.DATA.TRAIN.TRANSFORMS must start with {name: ImgPilToMultiCrop, ...}")
    spec = transforms[0]
    for key in ("total_num_crops", "num_crops", "size_crops", "crop_scales"):
        if key not in spec:
            raise ConfigError(f"config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop needs `{key}`")
    for key in ("num_crops", "size_crops", "crop_scales"):
        if not isinstance(spec[key], list):
            raise ConfigError(f"config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop {key} must be a list, got {spec[key]!r}")
    if not len(spec["num_crops"]) == len(spec["size_crops"]) == len(spec["crop_scales"]):
        raise ConfigError(
            "config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop num_crops, size_crops and crop_scales "
            "need one entry per crop resolution"
        )
    check_transforms(transforms)
    if sum(spec["num_crops"]) != spec["total_num_crops"]:
        raise ConfigError(
            f"config.DATA.TRAIN.TRANSFORMS: ImgPilToMultiCrop total_num_crops={spec['total_num_crops']}"
            f" but num_crops={list(spec['num_crops'])} sums to {sum(spec['num_crops'])}"
        )
    return spec


# Head name -> the parameters MODEL.HEAD.PARAMS may give it. `mlp` is swav_head's projection
# without prototypes, for methods that contrast the embeddings themselves (SimCLR).
HEAD_KEYS: dict[str, tuple[str, ...]] = {
    "swav_head": ("dims", "use_bn", "num_clusters"),
    "mlp": ("dims", "use_bn"),
}


def head_params(cfg: dict) -> dict:
    """The head's parameters with their defaults, plus its `name`; `num_clusters` is [] for mlp."""
    params = cfg["MODEL"]["HEAD"]["PARAMS"]
    if len(params) != 1 or len(params[0]) != 2 or params[0][0] not in HEAD_KEYS or not isinstance(params[0][1], dict):
        raise ConfigError(
            'config.MODEL.HEAD.PARAMS must be [["swav_head", {"dims": [...], "use_bn": true, '
            f'"num_clusters": [3000]}}]] or [["mlp", {{"dims": [...], "use_bn": true}}]], got {params!r}'
        )
    name, head = params[0][0], dict(params[0][1])
    unknown = set(head) - set(HEAD_KEYS[name])
    if unknown:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: {name} does not take {sorted(unknown)}; it takes {', '.join(HEAD_KEYS[name])}"
        )
    if not isinstance(head.get("dims"), list) or len(head["dims"]) < 1:
        raise ConfigError(f"config.MODEL.HEAD.PARAMS: {name} needs `dims`, e.g. [2048, 2048, 128]")
    head.setdefault("use_bn", True)
    head.setdefault("num_clusters", [3000] if name == "swav_head" else [])
    if not isinstance(head["num_clusters"], list):
        raise ConfigError(f"config.MODEL.HEAD.PARAMS: {name} num_clusters must be a list, got {head['num_clusters']!r}")
    check_ranges(head, HEAD_RANGES, prefix=f"config.MODEL.HEAD.PARAMS: {name} ")
    return {**head, "name": name}


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


def check_trunk(trunk: dict) -> None:
    """The trunk section names an architecture this package can build."""
    if trunk["NAME"] not in SUPPORTED_TRUNKS:
        raise ConfigError(
            f"config.MODEL.TRUNK.NAME={trunk['NAME']!r} is not available; supported: {', '.join(SUPPORTED_TRUNKS)}"
        )
    if trunk["NAME"] == "resnet":
        r = trunk["RESNETS"]
        if r["DEPTH"] not in RESNET_DEPTHS:
            raise ConfigError(f"config.MODEL.TRUNK.RESNETS.DEPTH={r['DEPTH']} is not one of {RESNET_DEPTHS}")
        if 64 * r["WIDTH_MULTIPLIER"] != round(64 * r["WIDTH_MULTIPLIER"]):
            raise ConfigError(
                f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={r['WIDTH_MULTIPLIER']}: the stem has "
                "64 x WIDTH_MULTIPLIER channels, which must be a whole number (0.25, 0.5, 1, 2, ...)"
            )
        if r["SMALL_STEM_STRIDE"] != 1 and not r["SMALL_STEM"]:
            raise ConfigError(
                f"config.MODEL.TRUNK.RESNETS.SMALL_STEM_STRIDE={r['SMALL_STEM_STRIDE']} applies to the "
                "small 3x3 stem only: also set config.MODEL.TRUNK.RESNETS.SMALL_STEM=true"
            )
        if r["DEPTH"] in BASIC_BLOCK_DEPTHS and (r["GROUPS"], r["WIDTH_PER_GROUP"]) != (1, 64):
            raise ConfigError(
                f"config.MODEL.TRUNK.RESNETS.GROUPS={r['GROUPS']}, WIDTH_PER_GROUP={r['WIDTH_PER_GROUP']}: "
                f"ResNet-{r['DEPTH']} has basic blocks, which need GROUPS=1 and WIDTH_PER_GROUP=64; "
                "use DEPTH >= 50 for ResNeXt"
            )
        return
    _regnet_types(trunk["REGNET"])
    try:
        regnet_block_params(**regnet_kwargs(trunk.get("REGNET")))
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
        text += f"-w{r['WIDTH_MULTIPLIER']:g}"
    if r["GROUPS"] != 1:
        text += f" {r['GROUPS']}x{r['WIDTH_PER_GROUP']}d"
    return text


# ----------------------------------------------------------------------------------------------
# The methods' LOSS sections
# ----------------------------------------------------------------------------------------------


@functools.cache
def _default_loss_sections() -> dict:
    return read_yaml(package_config_dir() / "defaults.yaml")["LOSS"]


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_method_sections(loss: dict) -> None:
    """Only the section of LOSS.name may differ from defaults.yaml: the others are not read, so a
    key set there (say a SwAV epsilon in a SimCLR run) would be silently ignored."""
    method = loss["name"]
    if method not in loss:
        return  # a method added to OBJECTIVES from outside the package has no section and may read any
    defaults = _default_loss_sections()
    for section, values in loss.items():
        if section in ("name", method) or not isinstance(values, dict):
            continue
        default = _leaves(defaults.get(section, {}))
        for key, value in _leaves(values).items():
            if key not in default or default[key] != value:
                raise ConfigError(
                    f"config.LOSS.{section}.{key}={value!r} is a setting of the method {section}, but this run "
                    f"trains config.LOSS.name={method}, which does not read it: set config.LOSS.name={section}, "
                    f"or leave config.LOSS.{section} at its defaults"
                )


def _check_crop_indices(where: str, chosen: list, num_crops: int) -> None:
    """`chosen` names different crops, each an index below `num_crops`."""
    bad = [c for c in chosen if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_crops]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"{where}={chosen}: each entry must be a different crop index below num_crops={num_crops}"
        )


def check_swav(loss: dict, crops: dict, head: dict, global_batch: int) -> None:
    """LOSS.swav_loss: the head has prototypes, the assigned crops exist, the queue holds a batch."""
    if not head["num_clusters"]:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: the {head['name']} head has no prototypes, which swav_loss needs: "
            "use swav_head with at least one entry in num_clusters"
        )
    _check_crop_indices(
        "config.LOSS.swav_loss.crops_for_assign", list(loss["crops_for_assign"]), int(crops["total_num_crops"])
    )
    length = int(loss["queue"]["queue_length"])
    if 0 < length < global_batch:
        raise ConfigError(
            f"config.LOSS.swav_loss.queue.queue_length={length} is smaller than the global batch {global_batch}:"
            f" set 0 to disable the queue or at least {global_batch}"
        )


def check_simclr(loss: dict, crops: dict, head: dict, global_batch: int) -> None:
    """LOSS.simclr_info_nce_loss: the head has no prototypes, and each image has negatives."""
    if head["num_clusters"]:
        # Nothing would train them, and DistributedDataParallel refuses parameters without gradient.
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: simclr_info_nce_loss uses no prototypes, but the head has "
            f"num_clusters={head['num_clusters']}: use the mlp head, "
            '[["mlp", {"dims": [...], "use_bn": true}]], or num_clusters: []'
        )
    if global_batch < 2:
        raise ConfigError(
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA: simclr_info_nce_loss needs a global batch of at least "
            "2 images (the negatives are the other images' crops)"
        )


def _check_memory_bank(name: str, loss: dict, crops: dict) -> None:
    """DeepCluster-v2 and SeLa-v2: the memory bank's crops exist."""
    _check_crop_indices(
        f"config.LOSS.{name}.memory_params.crops_for_mb",
        list(loss["memory_params"]["crops_for_mb"]),
        int(crops["total_num_crops"]),
    )


def check_deepclusterv2(loss: dict, crops: dict, head: dict, global_batch: int) -> None:
    """LOSS.deepclusterv2_loss: its prototypes are the k-means centroids, which the loss keeps, so
    the head must have none (the optimizer would train them, and nothing would use them)."""
    _check_memory_bank("deepclusterv2_loss", loss, crops)
    if head["num_clusters"]:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: deepclusterv2_loss scores the crops against its k-means centroids, "
            f"never trained, but the head has num_clusters={head['num_clusters']}: set num_clusters: [] "
            "in the head (the clusters per head are config.LOSS.deepclusterv2_loss.num_clusters)"
        )
    if not loss["num_clusters"]:
        raise ConfigError("config.LOSS.deepclusterv2_loss.num_clusters needs at least one entry (clusters per head)")


def check_sela_v2(loss: dict, crops: dict, head: dict, global_batch: int) -> None:
    """LOSS.sela_v2_loss: the prototypes are the head's, learned, so it needs some."""
    _check_memory_bank("sela_v2_loss", loss, crops)
    if not head["num_clusters"]:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: the {head['name']} head has no prototypes, which sela_v2_loss learns: "
            "use swav_head with at least one entry in num_clusters"
        )


# LOSS.name -> the checks of that method's section against the crops, the head and the global batch.
METHOD_CHECKS: dict[str, Callable[[dict, dict, dict, int], None]] = {
    "swav_loss": check_swav,
    "simclr_info_nce_loss": check_simclr,
    "deepclusterv2_loss": check_deepclusterv2,
    "sela_v2_loss": check_sela_v2,
}


def check_method(cfg: dict, crops: dict, head: dict, global_batch: int) -> None:
    """The section of LOSS.name agrees with the crops, the head and the global batch."""
    method = cfg["LOSS"]["name"]
    checks = METHOD_CHECKS.get(method)
    if checks is not None:  # a method added to OBJECTIVES from outside the package has no section here
        checks(cfg["LOSS"][method], crops, head, global_batch)


# ----------------------------------------------------------------------------------------------
# Rules between keys
# ----------------------------------------------------------------------------------------------


def check_processes(cfg: dict) -> None:
    """This machine's index is one of the NUM_NODES."""
    dist = cfg["DISTRIBUTED"]
    if dist["NODE_ID"] >= dist["NUM_NODES"]:
        raise ConfigError(
            f"config.DISTRIBUTED.NODE_ID={dist['NODE_ID']}: must be an integer in [0, NUM_NODES - 1] = "
            f"[0, {dist['NUM_NODES'] - 1}] (this machine's index)"
        )


def check_data_sources(train: dict) -> None:
    """DATA.TRAIN gives one source per path."""
    sources, paths = train["DATA_SOURCES"], train["DATA_PATHS"]
    if len(sources) != len(paths):
        raise ConfigError(
            f"config.DATA.TRAIN.DATA_SOURCES has {len(sources)} entries but DATA_PATHS has {len(paths)}:"
            " give one source per path"
        )


def check_crop_sizes(cfg: dict, crops: dict) -> None:
    # A crop must still be at least 2x2 when it enters the last stage (both trunks stride 32 with
    # their standard stems, the small ResNet stem 8 or 16): a 1x1 map there carries no spatial information, and oneDNN's
    # bfloat16 backward of a strided 3x3 conv on a 1x1 input returns garbage gradients
    # (torch 2.14 on CPU), which shows up as a NaN loss.
    trunk = cfg["MODEL"]["TRUNK"]
    small_stem = trunk["NAME"] == "resnet" and trunk["RESNETS"]["SMALL_STEM"]
    smallest = 8 * trunk["RESNETS"]["SMALL_STEM_STRIDE"] if small_stem else 32
    too_small = [s for s in crops["size_crops"] if s < smallest]
    if too_small:
        hint = "" if small_stem or trunk["NAME"] != "resnet" else (
            ", or use MODEL.TRUNK.RESNETS.SMALL_STEM=true for small images"
        )
        raise ConfigError(
            f"config.DATA.TRAIN.TRANSFORMS: size_crops: crop size {min(too_small)} is too small for this "
            f"{'ResNet' if trunk['NAME'] == 'resnet' else 'RegNet'} (at least {smallest} px{hint})"
        )


def check_head_width(cfg: dict, head: dict) -> None:
    """The head's first width is the number of features the trunk gives."""
    # Computed from the architecture's arithmetic, so checking a 10444-wide RegNet costs nothing.
    features = trunk_width(cfg["MODEL"]["TRUNK"])
    if int(head["dims"][0]) != features:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: {head['name']} dims[0]={head['dims'][0]} but the trunk "
            f"({describe_trunk(cfg['MODEL']['TRUNK'])}) gives {features} features; set dims to [{features}, ...]"
        )


def check_optimizer(optim: dict) -> None:
    """An LR schedule this package has, a warm-up within the run, and SGD settings torch accepts."""
    lr = optim["param_schedulers"]["lr"]
    if lr["name"] not in ("cosine", "multistep", "constant"):
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.lr.name={lr['name']!r}: use cosine, multistep or constant"
        )
    if lr["warmup_epochs"] > optim["num_epochs"]:
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.lr.warmup_epochs={lr['warmup_epochs']} is longer than"
            f" num_epochs={optim['num_epochs']}"
        )
    if optim["name"] != "sgd":
        raise ConfigError(f"config.OPTIMIZER.name={optim['name']!r}: only sgd is available")
    if optim["nesterov"] and optim["momentum"] == 0:
        # torch.optim.SGD refuses this combination, but only when training builds it.
        raise ConfigError("config.OPTIMIZER.nesterov=true needs config.OPTIMIZER.momentum > 0")


def check_machine(cfg: dict) -> None:
    """Precision, batch-norm synchronisation and device are ones this package knows."""
    amp = cfg["MODEL"]["AMP_PARAMS"]
    if amp["AMP_TYPE"] not in ("bfloat16", "float16"):
        raise ConfigError(f"config.MODEL.AMP_PARAMS.AMP_TYPE={amp['AMP_TYPE']!r}: use bfloat16 or float16")
    if amp["CPU_BFLOAT16"] not in ("auto", "always", "never"):
        raise ConfigError(f"config.MODEL.AMP_PARAMS.CPU_BFLOAT16={amp['CPU_BFLOAT16']!r}: use auto, always or never")
    if cfg["MODEL"]["SYNC_BN_CONFIG"]["SYNC_BN_TYPE"] not in ("pytorch", "apex"):
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE must be pytorch or apex")
    if cfg["MACHINE"]["DEVICE"] not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"config.MACHINE.DEVICE={cfg['MACHINE']['DEVICE']!r}: use auto, cpu or cuda")


def check_frozen_params(entries: list) -> None:
    """MODEL.TEMP_FROZEN_PARAMS_ITER_MAP is a list of [name, iterations >= -1]."""
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int)):
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP entries are [name, iterations], got {entry!r}"
            )
        if entry[1] < -1:
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP: {entry!r} needs iterations >= -1 "
                "(-1: frozen for the whole run, e.g. fixed random prototypes)"
            )


# ----------------------------------------------------------------------------------------------
# The inferred keys, and `infer`
# ----------------------------------------------------------------------------------------------


def derive(cfg: dict, crops: dict, head: dict, global_batch: int, world: int) -> None:
    """Write every key marked "inferred" in defaults.yaml into `cfg`, from values the checks have
    accepted: the method's shapes from the crops and the head, SwAV's queue in whole global
    batches split evenly over the processes, and the LR values scaled to the global batch."""
    method = cfg["LOSS"]["name"]
    num_crops, embedding_dim = int(crops["total_num_crops"]), int(head["dims"][-1])
    if method == "swav_loss":
        loss = cfg["LOSS"][method]
        loss["num_crops"], loss["embedding_dim"] = num_crops, embedding_dim
        loss["num_prototypes"] = [int(k) for k in head["num_clusters"]]
        if not loss["output_dir"]:
            loss["output_dir"] = cfg["CHECKPOINT"]["DIR"]
        queue = loss["queue"]
        length = int(queue["queue_length"])
        rounded = length - length % global_batch
        if rounded != length:
            logger.info("queue_length %d rounded down to %d, a multiple of the global batch %d", length, rounded, global_batch)
        queue["queue_length"], queue["local_queue_length"] = rounded, rounded // world
    elif method == "simclr_info_nce_loss":
        loss = cfg["LOSS"][method]
        loss["num_crops"], loss["embedding_dim"] = num_crops, embedding_dim
    elif method in ("deepclusterv2_loss", "sela_v2_loss"):
        loss = cfg["LOSS"][method]
        loss["num_crops"], loss["memory_params"]["embedding_dim"] = num_crops, embedding_dim
        if method == "sela_v2_loss":  # DeepCluster-v2's clusters are its own setting
            loss["num_clusters"] = [int(k) for k in head["num_clusters"]]

    # Linear scaling rule: every LR value is given per base_lr_batch_size images.
    lr = cfg["OPTIMIZER"]["param_schedulers"]["lr"]
    scaling = lr["auto_lr_scaling"]
    factor = global_batch / float(scaling["base_lr_batch_size"]) if scaling["auto_scale"] else 1.0
    scaling["scale_factor"] = factor
    lr["scaled"] = {k: lr[k] * factor for k in ("warmup_start_value", "base_value", "end_value")}


def infer(cfg: dict, world_size: int | None = None) -> dict:
    """Return a copy of `cfg` with every inferred key filled in and cross-key rules checked.

    The checks run first, in this order (the first that fails raises), then `derive` fills in
    the inferred keys, so nothing is derived from a value that has not been checked.
    """
    cfg = copy.deepcopy(cfg)
    check_ranges(cfg, RANGES)
    check_processes(cfg)
    world = world_size or world_size_of(cfg)
    check_method_sections(cfg["LOSS"])
    global_batch = int(cfg["DATA"]["TRAIN"]["BATCHSIZE_PER_REPLICA"]) * world
    check_data_sources(cfg["DATA"]["TRAIN"])
    check_trunk(cfg["MODEL"]["TRUNK"])
    # The loss reads its shapes from the data and model sections, so they cannot disagree.
    crops = multicrop_spec(cfg)
    check_crop_sizes(cfg, crops)
    head = head_params(cfg)
    check_head_width(cfg, head)
    check_method(cfg, crops, head, global_batch)
    check_optimizer(cfg["OPTIMIZER"])
    check_machine(cfg)
    check_frozen_params(cfg["MODEL"]["TEMP_FROZEN_PARAMS_ITER_MAP"])
    derive(cfg, crops, head, global_batch, world)
    return cfg

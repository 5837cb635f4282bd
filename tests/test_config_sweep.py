"""Every number in defaults.yaml set to 0, -1 and an absurd size: a config error, or it works.

The sweep walks defaults.yaml, so a key added there is swept too. Each integer and float key
(booleans and the keys whose comment says "inferred" left out: infer overwrites those) is set, in
a tiny config, to 0, -1 and 10**9 (ints) or 1e30 (floats). Either `load_config` refuses the value
with a ConfigError that names the key, or the command that reads the key runs on it without
raising anything but a ConfigError: two training iterations, or a tiny evaluation.

Numbers inside lists (crop sizes, head widths, kNN k's, SVM costs) are swept one entry at a
time: the override replaces the whole list with that one entry changed.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from swav.config import ConfigError, load_config, world_size_of
from swav.config.compose import compose, package_config_dir, parse_value, set_key
from swav.config.infer import infer
from swav.eval.commands import run_knn, run_linear, run_semisup, run_svm
from swav.train import train

DEFAULTS_TEXT = (package_config_dir() / "defaults.yaml").read_text()
DEFAULTS: dict = yaml.safe_load(DEFAULTS_TEXT)["config"]

ABSURD = {int: 10**9, float: 1e30}

# Training stops after this many iterations: the tiny run has 2 (16 images, 8 per batch, 1
# epoch), so it ends normally, through the end-of-epoch code; a valid but absurdly long run
# (a huge epoch count or dataset that no bound refuses) stops here instead of running for days.
STOP_AFTER_ITERS = 3


def _tiny_transforms() -> list[dict]:
    # The defaults' own list, so every transform number of defaults.yaml is in the tiny config,
    # with four crops of the smallest size a RegNet takes.
    transforms = copy.deepcopy(DEFAULTS["DATA"]["TRAIN"]["TRANSFORMS"])
    transforms[0].update(total_num_crops=4, num_crops=[2, 2], size_crops=[32, 32])
    return transforms


def _flow(value: Any) -> str:
    """`value` as a one-line YAML flow value (PyYAML writes 1e30 as 1.0e+30, a YAML 1.1 float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def _head(features: int) -> str:
    return (f'config.MODEL.HEAD.PARAMS=[["swav_head", {{"dims": [{features}, 16, 16], "use_bn": true, '
            '"num_clusters": [20, 12]}]]')


# A RegNet of two narrow blocks (16 features): a tiny training run took 0.7 s where the small-stem
# ResNet-18 of tests/test_train.py took 6 s (2 busy cores), so the ~100 runs of the sweep stay
# within a minute. The ResNet keys are swept on a ResNet-18 (RESNET below).
TINY = [
    "config.MACHINE.DEVICE=cpu",
    "config.MODEL.TRUNK.NAME=regnet",
    "config.MODEL.TRUNK.REGNET.depth=2",
    "config.MODEL.TRUNK.REGNET.w_0=8",
    "config.MODEL.TRUNK.REGNET.w_a=8.0",
    "config.MODEL.TRUNK.REGNET.w_m=2.0",
    "config.MODEL.TRUNK.REGNET.group_width=8",
    "config.MODEL.TRUNK.REGNET.stem_width=8",
    _head(16),
    "config.SEED_VALUE=0",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=16",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=8",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    f"config.DATA.TRAIN.TRANSFORMS={_flow(_tiny_transforms())}",
    "config.OPTIMIZER.num_epochs=1",
    "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",  # else both iterations are warm-up
    "config.MODEL.AMP_PARAMS.USE_AMP=false",
    "config.DATA.SYNTHETIC.NUM_CLASSES=2",  # 8 images per class: the SVMs cross-validate
    "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
    "config.LOG_FREQUENCY=1",
    "config.KNN_MONITOR.ENABLED=false",
    "config.KNN_MONITOR.COMPARE_RANDOM_INIT=false",
    "config.EVAL.BATCH_SIZE=16",
    "config.EVAL.LINEAR.NUM_EPOCHS=1",
    "config.EVAL.LINEAR.BATCH_SIZE=8",
    "config.EVAL.SEMISUP.NUM_EPOCHS=1",
    "config.EVAL.SEMISUP.BATCH_SIZE=8",
]
TINY_RAW: dict = compose(TINY)
RESNET = ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=18",
          "config.MODEL.TRUNK.RESNETS.SMALL_STEM=true", _head(512)]


# ----------------------------------------------------------------------------------------------
# Walking defaults.yaml
# ----------------------------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


def line_comments(text: str) -> dict[Path_, str]:
    """Each key's path (under `config:`) -> the comment on the key's line."""
    lines = text.splitlines()
    comments: dict[Path_, str] = {}

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                line = lines[key.start_mark.line]
                comments[(*path, key.value)] = line.split(" #", 1)[1] if " #" in line else ""
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    walk(yaml.compose(text), ())
    return {path[1:]: comment for path, comment in comments.items() if path[:1] == ("config",)}


def numeric_leaves(value: Any, path: Path_ = ()) -> Iterator[tuple[Path_, int | float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numeric_leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numeric_leaves(item, (*path, i))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def is_inferred(path: Path_, comments: dict[Path_, str]) -> bool:
    """Marked "inferred" on its own line or on a section above it (e.g. lr.scaled)."""
    return any(re.search(r"\binferred\b", comments.get(path[:n], "")) for n in range(1, len(path) + 1))


def _get(tree: Any, path: Path_) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _has(tree: Any, path: Path_) -> bool:
    try:
        _get(tree, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Cases and the command that reads each key
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str  # the dotted key an override sets, e.g. DATA.TRAIN.TRANSFORMS
    inner: Path_  # the number's place inside that key's list value; () for a plain number
    value: int | float

    @property
    def name(self) -> str:
        inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.inner)
        return f"{self.key}{inner}={self.value!r}"

    @property
    def field(self) -> str:
        """What the error message must name: the key, or for a list entry its field too."""
        names = [p for p in self.inner if isinstance(p, str)]
        return names[-1] if names else self.key.rsplit(".", 1)[-1]

    def override(self) -> str:
        if not self.inner:
            return f"config.{self.key}={_flow(self.value)}"
        key_path = tuple(self.key.split("."))
        # The tiny config's list where it has this entry (its head, its transforms), else the defaults'.
        source = TINY_RAW if _has(TINY_RAW, key_path + self.inner) else DEFAULTS
        value = copy.deepcopy(_get(source, key_path))
        _get(value, self.inner[:-1])[self.inner[-1]] = self.value
        return f"config.{self.key}={_flow(value)}"


def sweep_cases(defaults: dict = DEFAULTS, text: str = DEFAULTS_TEXT) -> list[Case]:
    comments = line_comments(text)
    cases = []
    for path, default in numeric_leaves(defaults):
        if is_inferred(path, comments):
            continue
        first_index = next((i for i, p in enumerate(path) if isinstance(p, int)), len(path))
        key, inner = ".".join(map(str, path[:first_index])), path[first_index:]
        kind = float if isinstance(default, float) else int
        cases += [Case(key, inner, kind(0)), Case(key, inner, kind(-1)), Case(key, inner, ABSURD[kind])]
    return cases


def _under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(f"{prefix}.")


# Longest prefix first: the command that reads the keys under each prefix.
COMMAND_OF_PREFIX = [
    ("DATA.SYNTHETIC.NUM_IMAGES_TEST", "knn"),
    ("DATA.TEST", "knn"),
    ("EVAL.KNN", "knn"),
    ("EVAL.LINEAR", "linear"),
    ("EVAL.SEMISUP", "semisup"),
    ("EVAL.SVM", "svm"),
    ("EVAL", "knn"),
    ("DISTRIBUTED", "launch"),
    ("", "train"),
]

# Keys that their command reads only in one of its modes: the overrides that turn it on.
MODE_OF_PREFIX = {
    "KNN_MONITOR": ["config.KNN_MONITOR.ENABLED=true"],
    "MODEL.TRUNK.RESNETS": RESNET,
    "OPTIMIZER.larc_config": ["config.OPTIMIZER.use_larc=true"],
    "LOSS.swav_loss.queue.start_iter": ["config.LOSS.swav_loss.queue.queue_length=16"],
    "EVAL.LINEAR.STEP_DECAYS": ["config.EVAL.LINEAR.LR_SCHEDULE=step"],
}


def command_of(key: str) -> str:
    return next(cmd for prefix, cmd in COMMAND_OF_PREFIX if _under(key, prefix))


def mode_of(key: str) -> tuple[str, ...]:
    return tuple(o for prefix, overrides in MODE_OF_PREFIX.items() if _under(key, prefix) for o in overrides)


def _train(cfg: DictConfig) -> None:
    train(cfg, stop_after_iters=STOP_AFTER_ITERS)


def _launch(cfg: DictConfig) -> None:
    # What `swav train` does before starting workers; one process trains in-process. No case
    # of the sweep reaches several processes (their counts are 0, -1 or absurd).
    assert world_size_of(cfg) == 1, "a multi-process config passed the checks: sweep it by hand"
    _train(cfg)


RUNNERS: dict[str, Callable[[DictConfig], Any]] = {
    "train": _train,
    "launch": _launch,
    "knn": run_knn,
    "linear": run_linear,
    "semisup": run_semisup,
    "svm": run_svm,
}


@functools.cache
def _composed(mode: tuple[str, ...]) -> dict:
    return compose([*TINY, *mode])


def overrides_of(case: Case, run_dir: Path) -> list[str]:
    return [*TINY, *mode_of(case.key), f"config.CHECKPOINT.DIR={run_dir}", case.override()]


def load_case(case: Case, run_dir: Path) -> DictConfig:
    """`load_config(overrides_of(case, run_dir))`, with the tiny config composed once.

    compose applies config.KEY=VALUE overrides after every file, in order, so setting the last
    two on the composed tiny config gives the same config, several times faster (parsing the
    YAML files is most of load_config's cost, and would be most of the sweep's).
    """
    raw = _composed(mode_of(case.key))
    for item in overrides_of(case, run_dir)[-2:]:
        dotted, text = item.removeprefix("config.").split("=", 1)
        value = parse_value(text)
        raw = set_key(raw, dotted, value, source=f"config.{dotted}={value!r}")
    cfg = OmegaConf.create(infer(raw))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _fingerprint(command: str, cfg: DictConfig) -> str:
    """The config without its run folder: equal fingerprints run the same thing."""
    tree = OmegaConf.to_container(cfg)
    tree["CHECKPOINT"]["DIR"] = tree["LOSS"]["swav_loss"]["output_dir"] = ""
    return command + json.dumps(tree, sort_keys=True)


# Learning rates have no upper bound: a rate far too large is valid, and the run stops with its
# divergence report (a FloatingPointError: `swav` exits 3 with "lower the learning rate").
# LARC's trust coefficient scales every step the same way.
STEP_SIZES = ("OPTIMIZER.param_schedulers.lr", "OPTIMIZER.larc_config.trust_coefficient",
              "EVAL.LINEAR.LR", "EVAL.SEMISUP.TRUNK_LR", "EVAL.SEMISUP.HEAD_LR")
DIVERGED = re.compile(r"lower (the )?(LR|learning rate)")

_ALREADY_RAN: set[str] = set()  # a value equal to the tiny config's runs once, not once per key
CASES = sweep_cases()


def test_the_sweep_finds_the_numbers_of_defaults_yaml():
    keys = {c.key + "".join(f".{p}" for p in c.inner) for c in CASES}
    assert {"LOG_FREQUENCY", "CHECKPOINT.CHECKPOINT_FREQUENCY", "OPTIMIZER.num_epochs",
            "DATA.TRAIN.TRANSFORMS.0.size_crops.1", "MODEL.HEAD.PARAMS.0.1.num_clusters.0",
            "EVAL.SVM.CV_FOLDS", "KNN_MONITOR.K"} <= keys
    # Inferred keys and booleans are not swept.
    assert not keys & {"LOSS.swav_loss.embedding_dim", "LOSS.swav_loss.queue.local_queue_length",
                       "OPTIMIZER.param_schedulers.lr.scaled.base_value",
                       "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scale_factor"}
    assert not any(k.endswith(("PIN_MEMORY", "use_bn")) for k in keys)
    assert Case("DATA.TRAIN.TRANSFORMS", (0, "size_crops", 1), 0).override().startswith(
        "config.DATA.TRAIN.TRANSFORMS=[{crop_scales: [[0.14, 1.0], [0.05, 0.14]], name: ImgPilToMultiCrop"
    )


def test_loading_a_case_is_load_config(tmp_path):
    refused = 0
    sample = CASES[::25]
    for case in sample:
        try:
            expected = load_config(overrides_of(case, tmp_path))
        except ConfigError as e:
            refused += 1
            with pytest.raises(ConfigError, match=re.escape(str(e))):
                load_case(case, tmp_path)
        else:
            assert load_case(case, tmp_path) == expected, case.name
    assert 0 < refused < len(sample)  # both outcomes compared


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_value_is_a_config_error_or_works(case: Case, tmp_path: Path):
    command = command_of(case.key)
    try:
        cfg = load_case(case, tmp_path)
    except ConfigError as e:
        assert f"config.{case.key}" in str(e) and case.field in str(e), f"the message does not name the key: {e}"
        return
    fingerprint = _fingerprint(command, cfg)
    if fingerprint in _ALREADY_RAN:
        return
    try:
        RUNNERS[command](cfg)
    except ConfigError:
        pass  # found late (e.g. a batch larger than the dataset), but said as a config error
    except FloatingPointError as e:
        if not (any(_under(case.key, p) for p in STEP_SIZES) and DIVERGED.search(str(e))):
            raise
    _ALREADY_RAN.add(fingerprint)

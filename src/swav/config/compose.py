"""Compose a config the way the SwAV guide's commands do.

`config=NAME` picks an experiment file, `+config/GROUP=OPTION` merges a config group option
(in command-line order), `config.KEY=VALUE` sets one key; key overrides are applied after all
files, as in Hydra. Every key is checked against the defaults file before anything runs.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = "config"  # every YAML file nests its keys under a top-level `config:`


class ConfigError(ValueError):
    """A config the user has to fix: the message says which key and how."""


def package_config_dir() -> Path:
    return Path(str(resources.files("swav") / "configs"))


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) != {CONFIG_ROOT}:
        raise ConfigError(f"{path}: the file must have a single top-level key `config:`")
    return data[CONFIG_ROOT] or {}


def available_configs() -> list[str]:
    root = package_config_dir() / CONFIG_ROOT
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config_file(name: str) -> Path:
    """`pretrain/swav/swav_8node_resnet`, or a path to the user's own YAML file."""
    user = Path(name).expanduser()
    if user.suffix in (".yaml", ".yml") or user.is_file():
        if not user.is_file():
            raise ConfigError(f"config={name}: no such file")
        return user
    packaged = package_config_dir() / CONFIG_ROOT / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    close = difflib.get_close_matches(name, available_configs(), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `swav config --list` to see them."
    raise ConfigError(f"config={name}: no such packaged config or file.{hint}")


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML, so lists, dicts, booleans and numbers work.

    Python spellings from the guide (False, True, None) are YAML too; `1e-08` stays a string
    in YAML 1.1 and is turned into a float during validation.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


def split_overrides(overrides: list[str]) -> tuple[str | None, list[str], list[tuple[str, Any]]]:
    """-> (config name, group options in order, key overrides in order)."""
    name: str | None = None
    groups: list[str] = []
    keys: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} has no '=': use config=NAME, config.KEY=VALUE or +config/GROUP=OPTION"
            )
        lhs, rhs = item.split("=", 1)
        if lhs == "config":
            if name is not None:
                raise ConfigError(f"config= is given twice ({name} and {rhs})")
            name = rhs
        elif lhs.startswith("+config/"):
            groups.append(f"{lhs[len('+config/'):]}/{rhs}")
        elif lhs.startswith("config."):
            keys.append((lhs[len("config.") :], parse_value(rhs)))
        else:
            raise ConfigError(
                f"override {item!r}: the key must start with 'config.' (e.g. config.OPTIMIZER.num_epochs=100)"
                " or be a group option +config/GROUP=OPTION"
            )
    return name, groups, keys


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[key.lower()]] if key.lower() in lowered else []
    return f" Did you mean {close[0]!r}?" if close else f" Valid keys here: {', '.join(choices)}."


def _coerce(value: Any, default: Any, where: str, source: str) -> Any:
    """Check `value` against the type of the default; the one allowed conversions are
    int -> float and numeric strings -> float (YAML 1.1 reads 1e-08 as a string)."""
    if default is None or value is None and not isinstance(default, (dict, list)):
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                ok = False
            else:
                ok = True
        else:
            ok = isinstance(value, float)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"{source}: config.{where} must be {type(default).__name__} (like {default!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


# Dict-valued keys whose contents are free-form (checked by the code that uses them).
OPEN_KEYS = {"MODEL.AMP_PARAMS.AMP_ARGS"}


def merge_checked(base: dict, update: dict, source: str, prefix: str = "") -> dict:
    """Deep-merge `update` into a copy of `base`, refusing keys `base` does not have."""
    out = dict(base)
    for key, value in update.items():
        where = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"{source}: unknown key config.{where}.{_suggest(str(key), [str(k) for k in base])}"
            )
        default = base[key]
        if isinstance(default, dict) and where not in OPEN_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config.{where} is a section; set its keys, not {value!r}")
            out[key] = merge_checked(default, value, source, f"{where}.")
        else:
            out[key] = _coerce(value, default, where, source)
    return out


def set_key(cfg: dict, dotted: str, value: Any, source: str) -> dict:
    """Return cfg with one dotted key replaced (checked like a file). A number after a list's key
    picks an entry: `DATA.TRAIN.TRANSFORMS.2.strength=1.0` sets one key of the third transform."""
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
        if isinstance(node, list):
            where = ".".join(parts[: i + 1])
            value = _replaced(node, parts[i + 1:], value, source, where)
            parts = parts[: i + 1]
            break
    update: Any = value
    for part in reversed(parts):
        update = {part: update}
    return merge_checked(cfg, update, source)


def _replaced(node: Any, parts: list[str], value: Any, source: str, where: str) -> Any:
    """A copy of `node` with the entry at `parts` (dict keys, list indices) set to `value`."""
    if not parts:
        return _coerce(value, node, where, source)
    part, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{source}: config.{where} is a list of {len(node)} entries; "
                              f"pick one with a number from 0 to {len(node) - 1}, or set the whole list")
        out = list(node)
        out[int(part)] = _replaced(node[int(part)], rest, value, source, f"{where}.{part}")
        return out
    if isinstance(node, dict):
        if part not in node:
            raise ConfigError(f"{source}: unknown key config.{where}.{part}.{_suggest(part, [str(k) for k in node])} "
                              f"To add a key, set the whole entry config.{where}")
        return {**node, part: _replaced(node[part], rest, value, source, f"{where}.{part}")}
    raise ConfigError(f"{source}: config.{where} is {type(node).__name__} {node!r}, it has no entry {part!r}")


def compose(overrides: list[str]) -> dict:
    """defaults -> config=NAME -> +config/ groups in order -> config.KEY=VALUE in order."""
    name, groups, keys = split_overrides(overrides)
    cfg = read_yaml(package_config_dir() / "defaults.yaml")
    name = name or "quickstart"
    path = resolve_config_file(name)
    cfg = merge_checked(cfg, read_yaml(path), source=str(path))
    for group in groups:
        path = package_config_dir() / CONFIG_ROOT / f"{group}.yaml"
        if not path.is_file():
            folder = path.parent
            options = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
            close = difflib.get_close_matches(path.stem, options, n=1, cutoff=0.6)
            hint = f" Did you mean: {close[0]}?" if close else ""
            hint += f" Options in that group: {', '.join(options)}." if options else ""
            raise ConfigError(f"+config/{group.rsplit('/', 1)[0]}={path.stem}: no such group option.{hint}")
        cfg = merge_checked(cfg, read_yaml(path), source=f"+config/{group}")
    for dotted, value in keys:
        cfg = set_key(cfg, dotted, value, source=f"config.{dotted}={value!r}")
    return cfg

"""Config: defaults -> experiment YAML -> command-line overrides, validated, then inferred."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from swav.config.compose import ConfigError, available_configs, compose
from swav.config.infer import infer, world_size_of

__all__ = ["ConfigError", "available_configs", "load_config", "to_yaml", "world_size_of"]


def load_config(overrides: list[str], world_size: int | None = None) -> DictConfig:
    """The config `swav config` prints: composed, checked and inferred, read-only."""
    cfg = OmegaConf.create(infer(compose(list(overrides)), world_size))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """YAML with the top-level `config:` key, so the file can be given back as config=FILE."""
    return OmegaConf.to_yaml(OmegaConf.create({"config": OmegaConf.to_container(cfg)}))

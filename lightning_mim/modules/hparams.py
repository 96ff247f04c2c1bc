"""Hyper-parameters as checkpoints store them: plain Python containers only."""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain_config(value: Any) -> Any:
    """OmegaConf containers, dicts and tuples -> plain dicts/lists, so checkpoints that record configs
    load with `torch.load(weights_only=True)`."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value

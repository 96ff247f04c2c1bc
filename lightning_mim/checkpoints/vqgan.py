"""Tokenizer checkpoints -> `VQGAN`: the official MaskGIT/MAGE weights and our own Lightning checkpoints.

Official layout: MAGE's `vqgan_jax_strongaug.ckpt` (the MaskGIT tokenizer ported to PyTorch), 168
tensors, bare or under `state_dict`; a MAGE pre-training checkpoint (`model` dict) carries the same
tensors under the prefix `vqgan.`. Our `VQGAN` uses the official parameter names, so the mapping table
from official keys to ours is the identity (`OFFICIAL_KEY_MAP` is where a renaming would go).

Our layouts: a `TokenizerModule` checkpoint (`hyper_parameters['vqgan']` + `state_dict['vqgan.*']`) and,
as a convenience, a stage-2 checkpoint (`hyper_parameters['tokenizer']['arch']` + `state_dict['tokenizer.*']`).
The module stores plain python hyper-parameters, so these load with `weights_only=True` too.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lightning_mim.nn.vqgan import VQGAN, official_maskgit_f16_config

__all__ = [
    "CheckpointMismatchError",
    "OFFICIAL_KEY_MAP",
    "build_vqgan",
    "load_state_dict_strict",
    "load_tokenizer",
    "load_vqgan",
    "official_state_dict",
    "official_maskgit_f16_config",
]

# official key -> our key. Empty: the names are identical (checked against the reference TSV in tests).
OFFICIAL_KEY_MAP: dict[str, str] = {}


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and mis-shaped key."""


def build_vqgan(arch: Mapping[str, Any]) -> VQGAN:
    """A fresh (randomly initialised) `VQGAN` from architecture kwargs (`conf/tokenizer/*.yaml: arch`)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(arch, DictConfig):
            arch = OmegaConf.to_container(arch, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return VQGAN(**dict(arch))


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint", *, assign: bool = False
) -> None:
    """`load_state_dict(strict=True)` with one readable error naming every problem at once.

    `assign=True` adopts the given tensors (for a module built on the meta device: no wasted init).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the tokenizer ({len(expected)} tensors expected, {len(state_dict)} given)"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                parts.append(f"{title} ({len(keys)}):\n  " + "\n  ".join(keys))
        raise CheckpointMismatchError("\n".join(parts))
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)


def _torch_load(path: str | Path, weights_only: bool) -> Any:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects that weights_only=True refuses to unpickle ({err}). "
            "If you trust the file, pass weights_only=False."
        ) from err


def official_state_dict(ckpt: Any) -> dict[str, Tensor]:
    """The tokenizer tensors out of any official container: bare, `state_dict`, or MAGE's `model` + `vqgan.`."""
    sd = ckpt
    if isinstance(sd, Mapping):
        for container in ("state_dict", "model"):
            if container in sd and isinstance(sd[container], Mapping):
                sd = sd[container]
                break
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    if any(k.startswith("vqgan.") for k in sd):  # MAGE pre-training checkpoint: the frozen tokenizer inside
        sd = {k[len("vqgan."):]: v for k, v in sd.items() if k.startswith("vqgan.")}
    return {OFFICIAL_KEY_MAP.get(k, k): v for k, v in sd.items()}


def load_tokenizer(path: str | Path, *, weights_only: bool = True) -> VQGAN:
    """The official MaskGIT tokenizer (MAGE's `vqgan_jax_strongaug.ckpt` layout), loaded strictly, in eval mode."""
    return _load_official(_torch_load(path, weights_only), path)


def _prefixed(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_vqgan(path: str | Path, *, weights_only: bool = True) -> VQGAN:
    """A `VQGAN` (eval mode) from our TokenizerModule checkpoint, a stage-2 checkpoint, or the official layout."""
    ckpt = _torch_load(path, weights_only)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("hyper_parameters"), Mapping) and "state_dict" in ckpt:
        hp, sd = ckpt["hyper_parameters"], ckpt["state_dict"]
        if "vqgan" in hp and any(k.startswith("vqgan.") for k in sd):  # TokenizerModule
            arch, prefix = hp["vqgan"], "vqgan."
        elif isinstance(hp.get("tokenizer"), Mapping) and "arch" in hp["tokenizer"]:  # stage-2 module
            arch, prefix = hp["tokenizer"]["arch"], "tokenizer."
        else:
            raise ValueError(
                f"{path} is a Lightning checkpoint but neither a TokenizerModule (hyper_parameters['vqgan']) "
                f"nor a stage-2 module (hyper_parameters['tokenizer']['arch']); hyper_parameters: {sorted(hp)}"
            )
        return _assemble(arch, _prefixed(sd, prefix), path)
    return _load_official(ckpt, path)


def _load_official(ckpt: Any, path: str | Path) -> VQGAN:
    return _assemble(official_maskgit_f16_config(), official_state_dict(ckpt), path)


def _assemble(arch: Mapping[str, Any], state_dict: Mapping[str, Tensor], path: str | Path) -> VQGAN:
    """Build on the meta device (no 54 M-parameter random init) and adopt the checkpoint's float tensors."""
    with torch.device("meta"):
        model = build_vqgan(arch)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    load_state_dict_strict(model, state_dict, source=str(path), assign=True)
    return model.eval()

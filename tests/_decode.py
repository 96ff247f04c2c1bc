"""A complete `decode` section for modules built in tests, read from conf/decode/ (the one source of
the decode defaults), so tests never restate them."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lightning_mim.orchestration.config import config_dir


def decode_config(option: str = "default", **overrides: Any) -> dict[str, Any]:
    """`conf/decode/<option>.yaml` as a plain dict (`schedule` from the cosine schedule unless given),
    with `overrides` applied: e.g. `decode_config(steps=4)`."""
    section = OmegaConf.to_container(OmegaConf.load(config_dir() / "decode" / f"{option}.yaml"), resolve=False)
    for parent in section.pop("defaults", []):  # e.g. mage.yaml extends default.yaml
        if parent != "_self_":
            section = {**decode_config(parent), **section}
    section["schedule"] = "cosine"
    unknown = set(overrides) - set(section)
    if unknown:
        raise KeyError(f"not decode settings: {sorted(unknown)}")
    return {**section, **overrides}

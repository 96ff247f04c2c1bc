"""LPIPS-VGG perceptual loss that never downloads: VGG16 features from a local file.

The network and the LPIPS linear heads are torchmetrics' own (`torchmetrics.functional.image.lpips`,
a maintained copy of Zhang et al.'s code); its package ships the linear-head weights
(`lpips_models/vgg.pth`). Only the ImageNet VGG16 backbone is missing offline: we build it with
`weights=None` and load a torchvision `vgg16` state dict (e.g. `vgg16-397923af.pth`) from the path the
config names. A missing file is the caller's decision (the tokenizer module warns and disables the loss).

The LPIPS weights are frozen constants, not model state: they are kept out of `state_dict()` (no
58 MB per tokenizer checkpoint) but still follow `.to(device/dtype)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

# VGG16 `features` indices of the 13 conv layers (weights and biases are the whole backbone state).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def load_vgg16_features(backbone: nn.Module, path: str | Path) -> None:
    """Copy `features.{i}.*` of a torchvision vgg16 state dict into torchmetrics' sliced Vgg16.

    Strict: every conv weight and bias must be present with the right shape, else one error lists them.
    """
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    target: dict[str, Tensor] = {}
    problems: list[str] = []
    for slice_name, block in backbone.named_children():  # slice1..slice5, children named by feature index
        for idx, layer in block.named_children():
            for pname, param in layer.named_parameters(recurse=False):
                key = f"features.{idx}.{pname}"
                if key not in sd:
                    problems.append(f"missing {key}")
                elif tuple(sd[key].shape) != tuple(param.shape):
                    problems.append(f"{key}: shape {tuple(sd[key].shape)} != expected {tuple(param.shape)}")
                else:
                    target[f"{slice_name}.{idx}.{pname}"] = sd[key]
    if problems:
        raise ValueError(f"{path} is not a torchvision vgg16 state dict: " + "; ".join(problems))
    backbone.load_state_dict(target, strict=True)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 backbone, as a loss: `forward(a, b) -> (B,)` for images in [0, 1]."""

    def __init__(self, vgg_weights_path: str | Path) -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        path = Path(vgg_weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VGG16 weights for LPIPS not found: {path}")
        # pretrained=True loads the linear heads shipped inside torchmetrics; pnet_rand=True builds VGG16
        # with weights=None (no download) - we load the backbone ourselves.
        net = _NoTrainLpips(net="vgg", pretrained=True, pnet_rand=True)
        load_vgg16_features(net.net, path)
        net.requires_grad_(False)
        self._net = [net]  # a list, so the frozen weights are not registered (see module docstring)
        self.vgg_weights_path = str(path)

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def _apply(self, fn: Callable, recurse: bool = True):  # keep the unregistered network on our device/dtype
        super()._apply(fn, recurse)
        self._net[0]._apply(fn, recurse)
        return self

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.net(a, b, normalize=True).flatten()

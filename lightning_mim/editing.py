"""Image editing on token grids, built on `decoding.decode`: inpainting, outpainting, class editing.

Everything works on (B, h, w) token grids; `logits_fn` has decode's contract (flat (B, N) ids ->
(B, N, K) logits) and carries the conditioning (e.g. the target class token) in its closure.
Class-conditional editing follows `maskgit/inference.py` (box -> latent mask enlarged by one cell,
decode from start_iter 2 of 12 steps, composite through a blurred mask). Inpainting and outpainting
map a pixel region to the cells that cover it (`region_cells`). The stage-2 modules' `inpaint`,
`outpaint` and `class_edit` run these functions on images (`modules/stage2.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mim.decoding import LogitsFn, decode

__all__ = [
    "region_cells",
    "inpaint",
    "outpaint",
    "class_edit_token_mask",
    "blurred_composite",
    "class_edit",
    "ClassEditResult",
]

Size2 = Union[int, Sequence[int]]


def _pair(x: Size2, name: str) -> tuple[int, int]:
    pair = (x, x) if isinstance(x, int) else tuple(int(v) for v in x)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {x!r}")
    return pair  # type: ignore[return-value]


def region_cells(region: Union[Sequence[int], Tensor], image_size: Size2, grid_size: Size2) -> Tensor:
    """The token cells covering a pixel region: a cell is in when at least one of its pixels is.

    region: a box (x0, y0, x1, y1) in integer pixels, x1 and y1 exclusive, with
        0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H; or a bool mask (H, W) or (B, H, W) (True = region).
    image_size: (H, W) or an int; grid_size: (h, w) or an int, with H, W multiples of h, w.
    Returns (h, w) bool for a box or an (H, W) mask, (B, h, w) for a (B, H, W) mask, on the mask's
    device. Re-generating these cells re-generates every pixel of the region (and the rest of the
    cells it touches): the region is never smaller than asked. Class editing enlarges its box by one
    more cell each side instead (`class_edit_token_mask`, the official rule).
    """
    img_h, img_w = _pair(image_size, "image_size")
    grid_h, grid_w = _pair(grid_size, "grid_size")
    if img_h % grid_h or img_w % grid_w:
        raise ValueError(f"image_size {(img_h, img_w)} must be a multiple of grid_size {(grid_h, grid_w)}")
    if isinstance(region, Tensor):
        if region.dtype != torch.bool:
            raise ValueError(f"a region mask must be bool (True = re-generate), got dtype {region.dtype}")
        if region.dim() not in (2, 3) or tuple(region.shape[-2:]) != (img_h, img_w):
            raise ValueError(f"a region mask must be (H, W) or (B, H, W) with H, W = {(img_h, img_w)}, got {tuple(region.shape)}")
        pixels = region
    else:
        if len(region) != 4 or any(isinstance(v, bool) or int(v) != v for v in region):
            raise ValueError(f"a region box must be 4 integer pixels (x0, y0, x1, y1), got {region!r}")
        x0, y0, x1, y1 = (int(v) for v in region)
        if not (0 <= x0 < x1 <= img_w and 0 <= y0 < y1 <= img_h):
            raise ValueError(f"box {tuple(region)} must satisfy 0 <= x0 < x1 <= {img_w}, 0 <= y0 < y1 <= {img_h}")
        pixels = torch.zeros(img_h, img_w, dtype=torch.bool)
        pixels[y0:y1, x0:x1] = True
    stride = (img_h // grid_h, img_w // grid_w)
    cells = F.max_pool2d(pixels.float().reshape(-1, 1, img_h, img_w), kernel_size=stride, stride=stride)
    return cells.reshape(*pixels.shape[:-2], grid_h, grid_w) > 0


def _decode_grid(logits_fn: LogitsFn, grid: Tensor, mask_id: int, decode_kwargs: dict[str, Any]):
    """decode() on a (B, h, w) grid; results reshaped back to grids (also each step if requested)."""
    batch, h, w = grid.shape
    result = decode(logits_fn, grid.reshape(batch, h * w), mask_id=mask_id, **decode_kwargs)
    if isinstance(result, tuple):
        tokens, history = result
        return tokens.view(batch, h, w), [s.view(batch, h, w) for s in history]
    return result.view(batch, h, w)


def inpaint(
    logits_fn: LogitsFn,
    tokens: Tensor,
    region: Tensor,
    *,
    mask_id: int,
    **decode_kwargs: Any,
):
    """Re-generate the tokens inside `region` ((B, h, w) or (h, w) bool); the rest stays unchanged.

    `decode_kwargs` go to `decode` (steps is required there). Returns (B, h, w) tokens, or
    (tokens, steps) with return_steps=True.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be a (B, h, w) grid, got shape {tuple(tokens.shape)}")
    if region.dtype != torch.bool:
        raise ValueError(f"region must be a bool mask, got dtype {region.dtype}")
    if region.shape not in (tokens.shape, tokens.shape[1:]):
        raise ValueError(f"region must have shape {tuple(tokens.shape)} or {tuple(tokens.shape[1:])}, got {tuple(region.shape)}")
    masked = tokens.masked_fill(region.to(tokens.device).expand_as(tokens), mask_id)
    return _decode_grid(logits_fn, masked, mask_id, decode_kwargs)


def outpaint(
    logits_fn: LogitsFn,
    tokens: Tensor,
    canvas_hw: Size2,
    offset: Sequence[int],
    *,
    mask_id: int,
    **decode_kwargs: Any,
):
    """Place the (B, h, w) grid at `offset` = (top, left) (token cells) on a larger canvas, generate the rest.

    `logits_fn` must accept the canvas' H·W tokens (the model needs positions for them). Returns
    (B, H, W) tokens (or (tokens, steps) with return_steps=True); the placed grid is unchanged.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be a (B, h, w) grid, got shape {tuple(tokens.shape)}")
    big_h, big_w = _pair(canvas_hw, "canvas_hw")
    top, left = (int(v) for v in offset)
    batch, h, w = tokens.shape
    if top < 0 or left < 0 or top + h > big_h or left + w > big_w:
        raise ValueError(f"a {h}x{w} grid at offset ({top}, {left}) does not fit in a {big_h}x{big_w} canvas")
    canvas = tokens.new_full((batch, big_h, big_w), mask_id)
    canvas[:, top : top + h, left : left + w] = tokens
    return _decode_grid(logits_fn, canvas, mask_id, decode_kwargs)


def class_edit_token_mask(box_xyxy_pixels: Sequence[float], image_size: Size2, grid_size: Size2) -> Tensor:
    """(h, w) bool token mask of a pixel box (x0, y0, x1, y1), enlarged by one latent cell each side.

    Reproduces `maskgit/inference.py` exactly (its box is top/left/height/width in integer pixels;
    s = image_size // grid_size is the tokenizer stride, 16 there):
        rows [max(0, top//s − 1), min(h, top//s + height//s + 1))
        cols [max(0, left//s − 1), min(w, left//s + width//s + 1))
    Note the official end is top//s + height//s + 1, not (top+height)//s + 1: for a box that does
    not start on a cell boundary it can stop one cell short of its far edge; we keep that quirk.
    """
    img_h, img_w = _pair(image_size, "image_size")
    grid_h, grid_w = _pair(grid_size, "grid_size")
    if img_h % grid_h or img_w % grid_w:
        raise ValueError(f"image_size {(img_h, img_w)} must be a multiple of grid_size {(grid_h, grid_w)}")
    stride_h, stride_w = img_h // grid_h, img_w // grid_w
    if len(box_xyxy_pixels) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1) in pixels, got {box_xyxy_pixels!r}")
    x0, y0, x1, y1 = (int(v) for v in box_xyxy_pixels)  # the official Bbox parses ints
    if not (0 <= x0 <= x1 <= img_w and 0 <= y0 <= y1 <= img_h):
        raise ValueError(f"box {box_xyxy_pixels!r} must satisfy 0 <= x0 <= x1 <= {img_w}, 0 <= y0 <= y1 <= {img_h}")
    top, left, height, width = y0, x0, y1 - y0, x1 - x0
    t = max(0, top // stride_h - 1)
    b = min(grid_h, height // stride_h + top // stride_h + 1)
    l = max(0, left // stride_w - 1)
    r = min(grid_w, left // stride_w + width // stride_w + 1)
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    mask[t:b, l:r] = True
    return mask


def blurred_composite(
    edited: Tensor,
    original: Tensor,
    box_mask: Tensor,
    radius: Optional[float] = None,
) -> Tensor:
    """edited·m + original·(1 − m), m = `box_mask` resized to the image and Gaussian-blurred.

    edited, original: (B, C, H, W) images. box_mask: (h, w) or (B, h, w), bool or float in [0, 1],
    at token or pixel resolution (H, W multiples of h, w); it is upsampled with nearest neighbour.
    radius: PIL's `GaussianBlur(radius)` = the Gaussian's standard deviation; default the official
    image_size // 16 − 1 (15 at 256 px). We blur with σ = radius and a kernel of 2·⌈3σ⌉ + 1 taps
    (torchvision `gaussian_blur`, reflect padding). The official code resizes the 0/255 mask with
    PIL's default (bicubic) filter and PIL approximates the Gaussian with box blurs; the two masks
    differ by ~1e-2 at most, only near the box edges.
    """
    from torchvision.transforms.v2.functional import gaussian_blur

    if edited.shape != original.shape or edited.dim() != 4:
        raise ValueError(f"edited and original must be (B, C, H, W) of one shape, got {tuple(edited.shape)}, {tuple(original.shape)}")
    batch, _, img_h, img_w = edited.shape
    m = box_mask.to(device=edited.device, dtype=torch.float32)
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3 or m.shape[0] not in (1, batch):
        raise ValueError(f"box_mask must be (h, w) or (B, h, w), got shape {tuple(box_mask.shape)}")
    if img_h % m.shape[1] or img_w % m.shape[2]:
        raise ValueError(f"box_mask {tuple(m.shape[1:])} must divide the image size {(img_h, img_w)}")
    m = F.interpolate(m[:, None], size=(img_h, img_w), mode="nearest")
    if radius is None:
        radius = max(img_h, img_w) // 16 - 1
    if radius > 0:
        half = min(math.ceil(3 * radius), img_h - 1, img_w - 1)  # reflect padding needs half < size
        if half > 0:
            m = gaussian_blur(m, kernel_size=[2 * half + 1, 2 * half + 1], sigma=[float(radius), float(radius)])
    m = m.to(edited.dtype)
    return edited * m + original * (1 - m)


@dataclass
class ClassEditResult:
    """tokens: the edited (B, h, w) grid; token_mask: the (h, w) re-generated cells; images: the
    blurred composite, when `original_images` and `tokens_to_images` were given (else None); steps:
    each decoding step's (B, h, w) grid with return_steps=True (else None)."""

    tokens: Tensor
    token_mask: Tensor
    images: Optional[Tensor] = None
    steps: Optional[list[Tensor]] = None


def class_edit(
    logits_fn: LogitsFn,
    tokens: Tensor,
    box_xyxy_pixels: Sequence[float],
    image_size: Size2,
    *,
    mask_id: int,
    steps: int = 12,
    start_iter: int = 2,
    original_images: Optional[Tensor] = None,
    tokens_to_images: Optional[Callable[[Tensor], Tensor]] = None,
    blur_radius: Optional[float] = None,
    **decode_kwargs: Any,
) -> ClassEditResult:
    """MaskGIT's class-conditional editing: re-generate a box under a (new) class, then composite.

    `logits_fn` must condition on the TARGET class (e.g. class token 1024 + label at position 0
    inside the closure). The box's cells, enlarged by one, are masked and decoded from step
    `start_iter` (2) of `steps` (12), the official setting. With `original_images` (B, C, H, W)
    and `tokens_to_images` ((B, h, w) tokens -> images, i.e. the tokenizer's decoder), the result
    also holds `blurred_composite(decoded, original_images, token_mask, blur_radius)`; with
    return_steps=True (a `decode_kwargs` key), also each step's grid.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be a (B, h, w) grid, got shape {tuple(tokens.shape)}")
    if (original_images is None) != (tokens_to_images is None):
        raise ValueError("pass both original_images and tokens_to_images to get the composite, or neither")
    token_mask = class_edit_token_mask(box_xyxy_pixels, image_size, tuple(tokens.shape[1:])).to(tokens.device)
    edited = inpaint(
        logits_fn, tokens, token_mask, mask_id=mask_id, steps=steps, start_iter=start_iter, **decode_kwargs
    )
    history = None
    if isinstance(edited, tuple):  # return_steps=True
        edited, history = edited
    images = None
    if tokens_to_images is not None:
        images = blurred_composite(tokens_to_images(edited), original_images, token_mask, blur_radius)
    return ClassEditResult(tokens=edited, token_mask=token_mask, images=images, steps=history)

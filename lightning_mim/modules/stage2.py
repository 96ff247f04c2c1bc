"""What the LightningModules on token grids share, in two layers.

`FrozenTokenizerModule`: a frozen tokenizer inside the module (its weights are part of the checkpoint,
so a checkpoint alone rebuilds everything), token or image batches (images are tokenized on the fly;
token shards are the fast path), and the optimiser plumbing that needs the trainer (global batch of
the base_lr rule, warm-up in epochs). MAGE fine-tuning builds on it.

`Stage2Module`: the generative models (MaskGIT, MAGE). A subclass supplies `logits_fn(labels, n)`
(token ids -> codebook logits, conditioning inside the closure) and `masked_loss(batch, generator)`;
the base draws masking ratios, runs the seeded validation step, generates with
`decoding.decode(self.logits_fn(labels, n), start, **self.decode_settings.as_kwargs())` and edits images
with the same decoding (`inpaint`, `outpaint`, `class_edit`: `editing.py` on images, pixels in and out).
"""

from __future__ import annotations

import inspect
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from torch import Tensor

from lightning_mim import editing
from lightning_mim.checkpoints.vqgan import load_vqgan
from lightning_mim.decoding import DecodeSettings, LogitsFn, decode
from lightning_mim.modules.hparams import plain_config
from lightning_mim.modules.token_memo import TokenMemo
from lightning_mim.nn.vqgan import VQGAN
from lightning_mim.optim import build_optimizer
from lightning_mim.tokens import TokenLayout

# `model.optim` keys: `optim.build_optimizer`'s arguments plus warm-up given in epochs.
OPTIM_KEYS = frozenset(inspect.signature(build_optimizer).parameters) - {"model", "groups"} | {"warmup_epochs"}
MASKED_CELL_GREY = 0.5  # how still-masked latent cells are painted in decoding-progression pictures
VAL_SEED = 1234  # validation masks come from a fixed generator: val/loss is comparable across steps


def masked_accuracy(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Top-1 accuracy of (B, N, K) `logits` against (B, N) `tokens` on the (B, N) bool `mask` positions."""
    return (logits.argmax(-1) == tokens)[mask].float().mean()


class FrozenTokenizerModule(pl.LightningModule):
    """Base class of modules that read token grids of a frozen tokenizer (see the module docstring)."""

    def __init__(self, *, tokenizer: dict[str, Any], num_classes: int, image_size: int) -> None:
        super().__init__()
        ckpt = tokenizer.get("ckpt")
        if ckpt and Path(ckpt).is_file():
            self.tokenizer = load_vqgan(ckpt)
        else:
            # Rebuilt from the architecture: when a stage-2 checkpoint is loaded, its state dict holds
            # the tokenizer weights (train.py refuses to *train* with a missing tokenizer file).
            if ckpt:
                warnings.warn(f"tokenizer checkpoint {ckpt} not found; expecting its weights from the stage-2 checkpoint")
            self.tokenizer = VQGAN(**tokenizer["arch"])
        self.tokenizer.requires_grad_(False).eval()
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        factor = self.tokenizer.downsample_factor
        if self.image_size % factor:
            raise ValueError(f"image_size {image_size} is not a multiple of the tokenizer's downsampling {factor}")
        self.grid = (self.image_size // factor, self.image_size // factor)
        self.n_tokens = self.grid[0] * self.grid[1]
        # Unconditional models still get one class slot: position 0 needs an id.
        self.layout = TokenLayout(self.tokenizer.codebook_size, max(1, self.num_classes))
        self.token_memo: TokenMemo | None = None  # set at fit start when the training images repeat exactly

    def on_fit_start(self) -> None:
        """Remember token grids by image content (`TokenMemo`) when the DataModule says its training
        images are deterministic (no random crop or flip) and the model runs on CPU: from the second
        epoch on, the frozen tokenizer is not run again. Results are unchanged (the tokenizer is frozen)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.device.type == "cpu" and getattr(datamodule, "deterministic_train_images", False):
            self.token_memo = TokenMemo()

    # -- tokenizer -------------------------------------------------------------------------------
    def train(self, mode: bool = True):  # the tokenizer stays in eval mode (no BN/dropout updates)
        super().train(mode)
        self.tokenizer.eval()
        return self

    @torch.no_grad()
    def to_tokens(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(images or tokens, labels) -> ((B, N) int64 tokens, labels)."""
        data, labels = batch
        if data.is_floating_point():  # images in [0, 1]: tokenize with the frozen tokenizer
            if self.token_memo is not None and data.device.type == "cpu":
                data = self.token_memo(data, self.tokenizer.encode_to_indices)
            else:
                data = self.tokenizer.encode_to_indices(data)
        return data.reshape(data.shape[0], -1).long(), labels.long()

    def model_inputs(self, data: Tensor, continuous: bool) -> tuple[Tensor, Tensor | None]:
        """Images or token ids -> (token ids (B, N), unquantized features (B, N, D) when `continuous`
        else None). Continuous input (MAGE's Table 6 ablation) needs images: token shards hold no features."""
        if not continuous:
            return self.to_tokens((data, data.new_zeros(len(data))))[0], None
        if not data.is_floating_point():
            raise ValueError(
                "arch.input_mode='continuous' needs image batches: token shards hold no continuous features "
                "(use an image DataModule, e.g. data=digits, or input_mode=tokens)"
            )
        return self.tokens_and_latents(data)

    @torch.no_grad()
    def tokens_and_latents(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) images -> ((B, N) int64 codes, (B, N, D) unquantized encoder features), from ONE
        tokenizer pass: the continuous-input ablation (MAGE Table 6) feeds the features and keeps the
        codes as its target."""
        z = self.tokenizer.encode(images)  # (B, D, h, w), before quantisation
        tokens = self.tokenizer.quantize_latents(z).indices.reshape(z.shape[0], -1).long()
        return tokens, z.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def tokens_to_images(self, tokens: Tensor) -> Tensor:
        """(B, N) codes -> (B, 3, H, W) images in [0, 1]; mask ids are painted grey."""
        masked = tokens >= self.layout.codebook_size
        codes = tokens.masked_fill(masked, 0).view(-1, *self.grid)
        images = self.tokenizer.decode_indices(codes).clamp(0, 1)
        if masked.any():
            cell = masked.view(-1, 1, *self.grid).float()
            cell = torch.nn.functional.interpolate(cell, size=images.shape[-2:], mode="nearest")
            images = images * (1 - cell) + MASKED_CELL_GREY * cell
        return images

    # -- optimisation -----------------------------------------------------------------------------
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks (per-device batch × world size × accumulation):
        the batch of MAGE's lr rule lr = base_lr · global_batch / 256."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            self._train_loader_ready()
            per_device = getattr(self.trainer.train_dataloader, "batch_size", None)
        if not per_device:
            raise ValueError("cannot infer the per-device batch size for base_lr scaling: set model.optim.global_batch")
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _train_loader_ready(self) -> None:
        # With max_steps set, `estimated_stepping_batches` never loads the data; we need its length.
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()

    def steps_per_epoch(self) -> int:
        """Optimizer steps per training epoch (for warm-ups given in epochs, as the papers do)."""
        self._train_loader_ready()
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("optim.warmup_epochs needs a finite epoch (set data.batches_per_epoch) or use warmup_steps")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def resolved_optim(self) -> dict[str, Any]:
        """`hparams.optim` with what needs the trainer filled in, ready for `optim.build_optimizer`:
        total_steps (default: the run's), warmup_epochs -> warmup_steps, and the global batch of the
        base_lr rule when no absolute lr is given."""
        optim = dict(self.hparams.optim)
        unknown = sorted(set(optim) - OPTIM_KEYS)
        if unknown:
            raise ValueError(f"unknown optim key(s) {unknown}; valid: {', '.join(sorted(OPTIM_KEYS))}")
        if optim.get("total_steps") is None:
            optim["total_steps"] = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_epochs = optim.pop("warmup_epochs", None)
        if warmup_epochs is not None:
            if optim.get("warmup_steps"):
                raise ValueError("optim: give warmup_epochs or warmup_steps, not both")
            optim["warmup_steps"] = round(float(warmup_epochs) * self.steps_per_epoch())
        if optim.get("lr") is None:
            optim.setdefault("global_batch", self.global_batch())
        return optim

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the tokenizer's real architecture, so the checkpoint rebuilds it even when the
        config named another (e.g. `tokenizer.ckpt` pointing at the official f=16 weights)."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and isinstance(hparams.get("tokenizer"), dict):
            hparams["tokenizer"] = {**hparams["tokenizer"], "arch": plain_config(self.tokenizer.config)}


class Stage2Module(FrozenTokenizerModule):
    """Generative stage 2: subclasses implement `logits_fn(labels, num_samples)` and
    `masked_loss(batch, generator) -> (loss, masked accuracy)`.

    ratio: a `_target_` spec of a masking-ratio distribution (`masking.py`); `n_tokens: null` is
        filled with the grid's token count. decode: every `DecodeSettings` field (the config's
        `decode` group), the settings `generate()` uses unless overridden per call.
    """

    def __init__(
        self, *, tokenizer: dict[str, Any], num_classes: int, image_size: int, ratio: dict[str, Any], decode: dict[str, Any]
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_classes=num_classes, image_size=image_size)
        self.decode_settings = DecodeSettings.from_mapping(decode)
        # Ratio distributions that depend on N (log, exp schedules) get the grid's token count.
        needs_n = "n_tokens" in ratio and ratio["n_tokens"] is None
        self.ratio_sampler = instantiate(ratio, **({"n_tokens": self.n_tokens} if needs_n else {}))

    # -- what subclasses supply -------------------------------------------------------------------
    def logits_fn(self, labels: Tensor | None, num_samples: int) -> LogitsFn:
        """(B, N) token ids -> (B, N, K) codebook logits, conditioned on `labels` (None: unconditional)."""
        raise NotImplementedError

    def masked_loss(self, batch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(loss, masked-token accuracy) of a batch under masks drawn from `generator`."""
        raise NotImplementedError

    # -- validation --------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        """The masked loss under masks seeded by VAL_SEED + batch index (same masks at every evaluation)."""
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + batch_idx)
        loss, accuracy = self.masked_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/masked_acc", accuracy, sync_dist=True)

    # -- generation --------------------------------------------------------------------------------
    def default_labels(self, num_samples: int) -> Tensor | None:
        """Class-balanced labels (0, 1, ..., C-1, 0, ...) or None when unconditional."""
        if self.num_classes == 0:
            return None
        return torch.arange(num_samples, device=self.device) % self.num_classes

    @property
    def cannot_generate(self) -> str | None:
        """None when `generate()` works; else why not (generation callbacks then skip with a warning)."""
        return None

    def decoding(self, labels: Tensor | None, num_samples: int, **overrides: Any) -> tuple[LogitsFn, dict[str, Any]]:
        """(logits_fn, the other keyword arguments of `decode` and of the `editing` functions) for
        `num_samples` samples conditioned on `labels`: `decode_settings` changed by `overrides`
        (DecodeSettings field names), the mask id, and the unconditional logits when guidance is on."""
        if self.cannot_generate:
            raise NotImplementedError(self.cannot_generate)
        settings = self.decode_settings.replace(**overrides)
        if settings.guidance_scale > 0 and self.num_classes == 0:
            raise ValueError(
                f"{type(self).__name__} is unconditional: classifier-free guidance (decode.guidance_scale > 0) does not apply"
            )
        uncond = self.logits_fn(None, num_samples) if settings.guidance_scale > 0 else None
        kwargs = {"mask_id": self.layout.mask_id, "uncond_logits_fn": uncond, **settings.as_kwargs()}
        return self.logits_fn(labels, num_samples), kwargs

    def generate_tokens(
        self,
        labels: Tensor | None,
        num_samples: int,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        **overrides: Any,
    ):
        """(num_samples, N) decoded token ids (and each step's grid with `return_steps`), from an all-mask
        start, with `decode_settings` changed by `overrides` (DecodeSettings field names)."""
        logits_fn, kwargs = self.decoding(labels, num_samples, **overrides)
        start = torch.full((num_samples, self.n_tokens), self.layout.mask_id, dtype=torch.long, device=self.device)
        return decode(logits_fn, start, generator=generator, return_steps=return_steps, **kwargs)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) inside the block, the previous mode after it."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor | None = None,
        num_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        **decode_overrides: Any,
    ):
        """Sample images (B, 3, H, W) in [0, 1]; with `return_steps`, also one image per decoding step."""
        if labels is None and num_samples is None:
            raise ValueError("give labels or num_samples")
        if labels is not None:
            num_samples = len(labels)
            labels = labels.to(self.device)
        elif self.num_classes:
            labels = self.default_labels(num_samples)
        with self.evaluating():
            out = self.generate_tokens(labels, num_samples, generator, return_steps, **decode_overrides)
        if not return_steps:
            return self.tokens_to_images(out)
        tokens, steps = out
        return self.tokens_to_images(tokens), [self.tokens_to_images(s) for s in steps]

    # -- editing: `editing.py` on images ------------------------------------------------------------
    # Images in and out are (B, 3, H, W) in [0, 1] (docs/CONVENTIONS.md). A decoder pass spreads every
    # token over its neighbours (and the tokenizer's GroupNorm over the whole image), so by default
    # (paste=True) the cells that were not re-generated are shown as the tokenizer's reconstruction of
    # the input, pixel for pixel: the edit changes nothing outside its cells, at the price of a seam
    # where the decoder would have blended the two. paste=False returns the decoder's image of the
    # whole edited grid (no seam; the kept cells' pixels move a little with their new neighbours).
    def edit_cells(self, region: Sequence[int] | Tensor) -> Tensor:
        """The (h, w) or (B, h, w) bool token cells `inpaint` re-generates for a pixel `region` of this
        model's image: a box (x0, y0, x1, y1) or a bool mask (H, W) / (B, H, W); every cell with a pixel
        in the region (`editing.region_cells`)."""
        return editing.region_cells(region, self.image_size, self.grid)

    def _edit_input(self, images: Tensor, *, full_size: bool = True) -> Tensor:
        """Checked (B, 3, H, W) images in [0, 1] (H = W = image_size if `full_size`), on this device."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if full_size and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} (the model's image_size), got {tuple(images.shape[-2:])}")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("images must be in [0, 1] (docs/CONVENTIONS.md)")
        return images.to(self.device)

    def _edit_tokens(self, images: Tensor) -> Tensor:
        """Images checked by `_edit_input` -> their (B, h, w) token grid on this module's device."""
        return self.tokenizer.encode_to_indices(images).long()

    def _edit_labels(self, labels: Tensor | int | Sequence[int] | None, batch: int) -> Tensor | None:
        """None, or (batch,) int64 class ids on this device (one int is every image's class)."""
        if labels is None:
            return None
        if self.num_classes == 0:
            raise ValueError(f"{type(self).__name__} is unconditional: pass labels=None")
        labels = torch.as_tensor(labels, device=self.device)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        labels = labels.long().expand(batch) if labels.dim() == 0 else labels.long()
        if labels.shape != (batch,):
            raise ValueError(f"labels must be one int or ({batch},) for {batch} images, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be classes in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return labels

    def _grid_images(self, grid: Tensor) -> Tensor:
        """(B, h, w) token grid -> (B, 3, H, W) images (`tokens_to_images`: mask ids grey)."""
        return self.tokens_to_images(grid.flatten(1))

    def _edited_images(self, decoded, kept: Tensor | None, cells: Tensor, return_steps: bool):
        """decode()'s (B, h, w) grid (and steps) -> images: the decoded `cells`, `kept`'s pixels elsewhere
        (the whole decoded image when `kept` is None)."""
        tokens, steps = decoded if return_steps else (decoded, None)
        images = self._grid_images(tokens)
        if kept is not None:
            images = editing.blurred_composite(images, kept, cells, radius=0)
        if not return_steps:
            return images
        return images, [self._grid_images(step) for step in steps]

    @torch.no_grad()
    def inpaint(
        self,
        images: Tensor,
        region: Sequence[int] | Tensor,
        labels: Tensor | int | None = None,
        *,
        paste: bool = True,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        start_iter: int = 0,
        **decode_overrides: Any,
    ):
        """Re-generate a pixel `region` of (B, 3, H, W) images; everything else is kept.

        region: a box (x0, y0, x1, y1) or a bool mask (H, W) / (B, H, W), in pixels of the model's
            image; the cells covering it are re-generated (`edit_cells`).
        labels: the class(es) to condition on (one int or (B,); class-conditional models only);
            None: MaskGIT's "no class" id, MAGE's unconditional decoding.
        Decoding: `decode_settings` (the checkpoint's config) changed by `decode_overrides`
        (DecodeSettings names), from step `start_iter`; `generator` lives on the module's device.
        Returns (B, 3, H, W) images: the decoded cells, the tokenizer's reconstruction elsewhere
        (`paste=False`: the decoded image everywhere, see above); with `return_steps`, also one
        picture per decoding step (still-masked cells grey).
        """
        tokens = self._edit_tokens(self._edit_input(images))
        cells = self.edit_cells(region).to(self.device)
        labels = self._edit_labels(labels, len(tokens))
        with self.evaluating():
            logits_fn, kwargs = self.decoding(labels, len(tokens), **decode_overrides)
            decoded = editing.inpaint(
                logits_fn, tokens, cells, generator=generator, return_steps=return_steps, start_iter=start_iter, **kwargs
            )
            return self._edited_images(decoded, self._grid_images(tokens) if paste else None, cells, return_steps)

    @torch.no_grad()
    def outpaint(
        self,
        images: Tensor,
        canvas: int | Sequence[int] | None = None,
        offset: Sequence[int] = (0, 0),
        labels: Tensor | int | None = None,
        *,
        fill: float = 0.0,
        paste: bool = True,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        start_iter: int = 0,
        **decode_overrides: Any,
    ):
        """Place (B, 3, h, w) images at pixel `offset` (top, left) of a `canvas` and generate the rest.

        canvas: (H, W) or an int in pixels; None = the model's image. MaskGIT and MAGE have positions
            for their own token grid only, so another canvas size is an error.
        h, w, top and left must be multiples of the tokenizer's cell (`tokenizer.downsample_factor`
            pixels). The tokenizer reads the placed image on a canvas of `fill` (0: black), a full-size
            image as in training (an image tokenized alone comes back with dark seams at its edges);
            the tokens of the cells it covers are kept (`editing.outpaint`), all others generated.
        labels, decoding, `paste`, `return_steps`: as `inpaint`.
        Returns (B, 3, H, W) images: that canvas's reconstruction where the image was placed, the
        generated cells around it.
        """
        size = (self.image_size, self.image_size)
        canvas_hw = size if canvas is None else tuple(int(v) for v in ((canvas, canvas) if isinstance(canvas, int) else canvas))
        if canvas_hw != size:
            raise ValueError(
                f"canvas {canvas_hw}: {type(self).__name__} has token positions for its {size[0]}x{size[1]} image only "
                "(image_size); place a smaller image on it"
            )
        stride = self.tokenizer.downsample_factor
        (h, w), (top, left) = images.shape[-2:], (int(v) for v in offset)
        if any(v % stride for v in (h, w, top, left)):
            raise ValueError(
                f"the placed image ({h}x{w}) and its offset {(top, left)} must be multiples of the tokenizer's cell, {stride} px"
            )
        if top < 0 or left < 0 or top + h > size[0] or left + w > size[1]:
            raise ValueError(f"a {h}x{w} image at offset {(top, left)} does not fit in the {size[0]}x{size[1]} canvas")
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must be in [0, 1] (an image value), got {fill}")
        placed = torch.full((len(images), 3, *size), float(fill), device=self.device)
        placed[:, :, top : top + h, left : left + w] = self._edit_input(images, full_size=False)
        tokens = self._edit_tokens(placed)
        labels = self._edit_labels(labels, len(tokens))
        row, col = top // stride, left // stride
        with self.evaluating():
            logits_fn, kwargs = self.decoding(labels, len(tokens), **decode_overrides)
            decoded = editing.outpaint(
                logits_fn, tokens[:, row : row + h // stride, col : col + w // stride], self.grid, (row, col),
                generator=generator, return_steps=return_steps, start_iter=start_iter, **kwargs,
            )
            cells = ~self.edit_cells((left, top, left + w, top + h)).to(self.device)
            return self._edited_images(decoded, self._grid_images(tokens) if paste else None, cells, return_steps)

    @torch.no_grad()
    def class_edit(
        self,
        images: Tensor,
        box: Sequence[int],
        target_labels: Tensor | int,
        *,
        composite: bool = True,
        blur_radius: float | None = None,
        steps: int = 12,
        start_iter: int = 2,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
        **decode_overrides: Any,
    ):
        """MaskGIT's class-conditional editing (`editing.class_edit`, maskgit/inference.py) of images.

        box: (x0, y0, x1, y1) in pixels of the model's image; its cells, enlarged by one each side
            (`editing.class_edit_token_mask`), are re-generated under `target_labels` (one int or (B,)).
        steps, start_iter: the official 2 of 12, not the checkpoint's decode.steps; the other decode
            settings are the checkpoint's unless given in `decode_overrides`.
        composite: True (official): the decoded image blended into the input through the blurred
            cell mask (`editing.blurred_composite`, `blur_radius`, default image_size // 16 − 1);
            False: the decoded cells on the tokenizer's reconstruction, as `inpaint` returns them.
        Returns (B, 3, H, W) images (and one picture per decoding step with `return_steps`).
        """
        if self.num_classes == 0:
            raise ValueError(f"class_edit needs a class-conditional model; this {type(self).__name__} is unconditional")
        if target_labels is None:
            raise ValueError("class_edit needs target_labels (the class to edit the box into)")
        images = self._edit_input(images)
        tokens = self._edit_tokens(images)
        labels = self._edit_labels(target_labels, len(tokens))
        with self.evaluating():
            logits_fn, kwargs = self.decoding(labels, len(tokens), steps=steps, **decode_overrides)
            result = editing.class_edit(
                logits_fn, tokens, box, self.image_size, start_iter=start_iter, blur_radius=blur_radius,
                original_images=images if composite else None,
                tokens_to_images=self._grid_images if composite else None,
                generator=generator, return_steps=return_steps, **kwargs,
            )
            if not composite:
                decoded = (result.tokens, result.steps) if return_steps else result.tokens
                return self._edited_images(decoded, self._grid_images(tokens), result.token_mask, return_steps)
            return (result.images, [self._grid_images(step) for step in result.steps]) if return_steps else result.images

"""`python -m lightning_mim.edit ckpt=PATH input=IMAGE_OR_FOLDER task=inpaint|outpaint|class_edit ...`:
MaskGIT's three editing applications on image files, with a trained stage-2 checkpoint.

    python -m lightning_mim.edit ckpt=CKPT input=digits task=inpaint box=8,8,24,24
    python -m lightning_mim.edit ckpt=CKPT input=digits task=outpaint box=0,0,16,32
    python -m lightning_mim.edit ckpt=CKPT input=digits task=class_edit box=4,4,28,28 target=3

Keys (Hydra's override grammar; a list is `box=8,8,24,24` or `box=[8,8,24,24]`):
  ckpt         a MaskGIT or MAGE checkpoint; its run's config.yaml (beside checkpoints/) describes it
  input        an image file, or a folder of them (not recursive, sorted by name); every image is
               resized to the model's image size (shorter side, then a centre crop) as the DataModules do
  task         inpaint | outpaint | class_edit
  box          x0,y0,x1,y1 in pixels of the model's image (x1, y1 exclusive). inpaint: the region to
               re-generate (every token cell it touches); outpaint: the region to keep, on the token
               grid, the rest is generated; class_edit: the region to edit (its cells and one more
               cell around them are re-generated, as maskgit/inference.py does)
  mask         inpaint, instead of box: a mask image, white = re-generate (resized to the image)
  target       class_edit: the class to edit into (a class index of the checkpoint)
  label        inpaint / outpaint with a class-conditional model: the class to condition on. Default:
               the number in `<image name>.cls` beside the image when there is one (extracting a
               shard of `lightning_mim.data.prepare` gives such pairs), else no class
  offset       outpaint: top,left where the kept box goes on the canvas (default: where it was)
  paste        inpaint / outpaint: true (default): the kept cells are the tokenizer's reconstruction
               of the input, pixel for pixel (a seam can show at the cell edges); false: the decoder's
               image of the whole edited grid (no seam; the kept cells move a little)
  composite    class_edit: blend the edit into the input through the blurred box (official; true)
  start_iter   the first decoding step (default 0; class_edit 2, the official value)
  decode.KEY   decoding settings (default: the checkpoint's; class_edit: decode.steps=12, official)
  seed         seed of the decoding's random numbers (default 0)
  limit        edit only the first N images of the folder
  progression  true: also write each image's decoding progression (default false)
  out          output folder (default: $LIGHTNING_MIM_HOME/edits/<task>, else lmim/edits/<task>)

Writes, per image, `<name>.png` (before | mask: the re-generated cells grey | after), with
progression=true `<name>_steps.png` (mask, each decoding step, after), and `edits.png` with every
image (rows before / mask / after, 8 images a block). Bad input stops before the checkpoint is loaded,
in one line per problem (`key=value: what is allowed`), with exit status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lightning_mim.orchestration.config import DEFAULT_HOME, ConfigError, checkpoint_file, parse_overrides, report_config_error, usage_status
from lightning_mim.orchestration.evaluate import base_config, load_module
from lightning_mim.orchestration.noise import filter_known_noise
from lightning_mim.orchestration.schema import format_problem
from lightning_mim.tokens import downsample_factor

TASKS = ("inpaint", "outpaint", "class_edit")
# key -> the tasks it applies to (None: every task)
KEYS: dict[str, tuple[str, ...] | None] = {
    "ckpt": None, "input": None, "task": None, "box": None, "mask": ("inpaint",), "target": ("class_edit",),
    "label": ("inpaint", "outpaint"), "offset": ("outpaint",), "paste": ("inpaint", "outpaint"),
    "composite": ("class_edit",), "start_iter": None,
    "seed": None, "limit": None, "progression": None, "out": None,
}
DECODE_PREFIX = "decode."
CLASS_EDIT_STEPS = 12  # maskgit/inference.py: start_iter 2 of 12 steps
BATCH = 64  # images edited at once
BLOCK = 8  # images per block of edits.png
MASK_GREY = 0.5  # the re-generated cells in the mask pictures (as still-masked cells in progressions)


@dataclass(frozen=True)
class Editable:
    """What the checkpoint's config says about editing with it."""

    image_size: int
    cell: int  # pixels per token cell (the tokenizer's downsampling)
    num_classes: int  # 0: unconditional
    decode: dict[str, Any]


@dataclass
class EditRequest:
    """The command line, parsed and checked (`parse_request`, then `check_request` against the model)."""

    ckpt: Path
    task: str
    inputs: list[Path]
    values: dict[str, Any] = field(default_factory=dict)  # the other keys, typed
    shown: dict[str, str] = field(default_factory=dict)  # key -> the value as typed (for messages)
    decode: dict[str, Any] = field(default_factory=dict)  # decode.KEY overrides

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


# -- parsing ------------------------------------------------------------------------------------------
def parse_request(argv: Sequence[str]) -> EditRequest:
    """The keys of the command line, typed, with the files they name checked; `ConfigError` (one line per
    problem) otherwise. The checkpoint is not read."""
    from lightning_mim.data.folder import IMAGE_EXTENSIONS

    raw: dict[str, Any] = {}
    shown: dict[str, str] = {}
    for override in parse_overrides(argv):
        key = override.key_or_group
        raw[key] = list(override.sweep_iterator()) if override.is_sweep_override() else override.value()
        shown[key] = override.input_line.partition("=")[2]
    problems: list[str] = []

    def problem(key: str, allowed: str) -> None:
        problems.append(format_problem((key, shown[key], allowed)))

    def missing(key: str, what: str) -> None:
        problems.append(f"{key}: {what}")

    unknown = [k for k in raw if k not in KEYS and not k.startswith(DECODE_PREFIX)]
    for key in unknown:
        problem(key, f"unknown key; valid: {', '.join(KEYS)}, decode.KEY")
    for key in ("ckpt", "input", "task"):
        if raw.get(key) in (None, ""):
            missing(key, "is required")
    task = raw.get("task")
    if task is not None and task not in TASKS:
        problem("task", f"must be one of {', '.join(TASKS)}")
    elif task is not None:
        for key in raw:
            if KEYS.get(key) is not None and task not in KEYS[key]:
                problem(key, f"applies to task={' or task='.join(KEYS[key])} only")
    ckpt = Path(str(raw.get("ckpt", ""))).expanduser()
    if raw.get("ckpt") not in (None, ""):
        try:
            checkpoint_file("ckpt", ckpt)  # missing, or no PyTorch checkpoint (empty, cut)
        except ConfigError as err:
            problems.append(str(err))
    inputs: list[Path] = []
    if raw.get("input") not in (None, ""):
        where = Path(str(raw["input"])).expanduser()
        if where.is_dir():
            inputs = sorted(p for p in where.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif where.is_file() and where.suffix.lower() in IMAGE_EXTENSIONS:
            inputs = [where]
        if not inputs:
            problem("input", f"must be an image file or a folder with images ({', '.join(IMAGE_EXTENSIONS)})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("ckpt", "input", "task") or key.startswith(DECODE_PREFIX) or key in unknown:
            continue
        try:
            values[key] = _typed(key, value)
        except ValueError as err:
            problem(key, str(err))
    if task == "inpaint" and ("box" in raw) == ("mask" in raw):
        missing("box", "task=inpaint needs box=x0,y0,x1,y1 or mask=IMAGE (one of them)")
    if task in ("outpaint", "class_edit") and "box" not in raw:
        missing("box", f"is required for task={task} (x0,y0,x1,y1 in pixels)")
    if task == "class_edit" and "target" not in raw:
        missing("target", "is required for task=class_edit (the class to edit into)")
    if "limit" in values:
        inputs = inputs[: values["limit"]]
    if problems:
        raise ConfigError("\n".join(problems))
    decode = {k[len(DECODE_PREFIX) :]: v for k, v in raw.items() if k.startswith(DECODE_PREFIX)}
    return EditRequest(ckpt=ckpt, task=str(task), inputs=inputs, values=values, shown=shown, decode=decode)


def _typed(key: str, value: Any) -> Any:
    """A key's value as the type it must have; ValueError says what is allowed."""
    if key in ("box", "offset"):
        n = 4 if key == "box" else 2
        if not (isinstance(value, list) and len(value) == n and all(type(v) is int for v in value)):
            raise ValueError(f"must be {n} integers ({'x0,y0,x1,y1' if n == 4 else 'top,left'} in pixels)")
        return tuple(value)
    if key in ("target", "label", "seed", "start_iter", "limit"):
        low = 1 if key == "limit" else 0
        if type(value) is not int or value < low:
            raise ValueError(f"must be an integer >= {low}")
        return value
    if key in ("composite", "paste", "progression"):
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if key == "mask":
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise ValueError("must be an existing image file (white = re-generate)")
        return path
    return Path(str(value)).expanduser()  # out


# -- checks against the checkpoint's config --------------------------------------------------------------
def editable(cfg: DictConfig, shown_ckpt: str) -> Editable:
    """What editing needs to know of the checkpoint's model, from its config; `ConfigError` when the
    checkpoint cannot edit (not a generative stage-2 model, or a continuous-input MAGE)."""
    from lightning_mim.modules.stage2 import Stage2Module

    target = str(OmegaConf.select(cfg, "model._target_", default=""))
    model_class = get_class(target) if target else None
    if model_class is None or not issubclass(model_class, Stage2Module):
        raise ConfigError(format_problem((
            "ckpt", shown_ckpt,
            f"a {target.rpartition('.')[2] or 'model-less'} checkpoint cannot edit; editing needs a MaskGIT or MAGE "
            "checkpoint (model=maskgit, mage)",
        )))
    if OmegaConf.select(cfg, "model.arch.input_mode") == "continuous":
        raise ConfigError(format_problem((
            "ckpt", shown_ckpt,
            "a continuous-input MAGE (model.arch.input_mode=continuous) cannot edit: decoding feeds token ids back, "
            "which it has no features for; editing needs model.arch.input_mode=tokens",
        )))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    conditional = model.get("conditional", True) and "num_classes" in model
    return Editable(
        image_size=int(model["image_size"]),
        cell=downsample_factor(model["tokenizer"]["arch"]["channel_multipliers"]),
        num_classes=int(model["num_classes"]) if conditional else 0,
        decode=dict(model["decode"]),
    )


def check_request(request: EditRequest, model: Editable) -> None:
    """Every value of `request` against the model it will run on; `ConfigError` lists the problems."""
    from lightning_mim.decoding import DecodeSettings

    problems: list[str] = []
    size, cell, classes = model.image_size, model.cell, model.num_classes
    shown, task = request.shown, request.task

    def problem(key: str, allowed: str) -> None:
        problems.append(format_problem((key, shown.get(key, ""), allowed)))

    box = request.get("box")
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            problem("box", f"must be x0,y0,x1,y1 with 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size} "
                    f"(pixels of the model's {size}x{size} image)")
        elif task == "outpaint" and any(v % cell for v in box):
            problem("box", f"must lie on the token grid for task=outpaint: multiples of {cell} px")
        elif task == "outpaint" and "offset" in request.values:
            (top, left), height, width = request.get("offset"), y1 - y0, x1 - x0
            if top % cell or left % cell or not (0 <= top <= size - height and 0 <= left <= size - width):
                problem("offset", f"must be top,left in multiples of {cell} px that keep the {height}x{width} box inside "
                        f"the {size}x{size} canvas: top <= {size - height}, left <= {size - width}")
    if "mask" in request.values and not region_mask(request.get("mask"), size).any():
        problem("mask", "has no white pixel (white = re-generate)")
    for key in ("target", "label"):
        if key in request.values:
            if classes == 0:
                problem(key, f"the checkpoint's model is unconditional: {'task=class_edit needs a class-conditional model' if key == 'target' else 'give no label'}")
            elif request.get(key) >= classes:
                problem(key, f"must be a class of the checkpoint: 0..{classes - 1}")
    settings = {**model.decode, **({"steps": CLASS_EDIT_STEPS} if task == "class_edit" else {}), **request.decode}
    try:
        steps = DecodeSettings.from_mapping(settings).steps
    except ValueError as err:
        problems.append(str(err))  # already `decode.KEY=value: what is allowed`
    else:
        start = request.get("start_iter", 2 if task == "class_edit" else 0)
        if start >= steps:
            problems.append(format_problem(("start_iter", start, f"must be < decode.steps={steps}")))
    if classes and task != "class_edit" and "label" not in request.values:
        for path in request.inputs:
            label = sidecar_label(path)
            if label is not None and not 0 <= label < classes:
                problems.append(format_problem(("input", str(path.with_suffix(".cls")), f"holds {label}: not a class of the checkpoint (0..{classes - 1})")))
    if problems:
        raise ConfigError("\n".join(problems))


def sidecar_label(image: Path) -> int | None:
    """The integer in `<image>.cls` (what extracting a webdataset shard gives), or None without the file."""
    path = image.with_suffix(".cls")
    if not path.is_file():
        return None
    text = path.read_text(errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ConfigError(format_problem(("input", str(path), f"holds {text[:20]!r}: a .cls file must hold one integer"))) from None


# -- editing ------------------------------------------------------------------------------------------
def load_images(paths: Sequence[Path], size: int, *, interpolation: str = "bicubic") -> Tensor:
    """(B, 3, size, size) float images in [0, 1], resized and centre-cropped as the DataModules do."""
    import numpy as np

    from lightning_mim.data.folder import load_image

    arrays = [load_image(p, size, interpolation=interpolation) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def region_mask(path: Path, size: int) -> Tensor:
    """A mask image -> (size, size) bool, True where it is white (resized with nearest neighbour)."""
    return load_images([path], size, interpolation="nearest")[0].mean(0) >= 0.5


def edit_batch(module, request: EditRequest, images: Tensor, labels: Tensor | None, generator: torch.Generator,
               mask: Tensor | None = None):
    """One batch through the module's editing method: (before, masked input picture, after, steps or
    None). `mask`: the (H, W) bool region of inpainting by `mask=` (`region_mask`, read once per run)."""
    from lightning_mim.editing import blurred_composite, class_edit_token_mask

    progression = bool(request.get("progression", False))
    kwargs: dict[str, Any] = {"generator": generator, "return_steps": progression, **request.decode}
    for key in ("start_iter", "paste"):
        if key in request.values:
            kwargs[key] = request.get(key)
    box = request.get("box")
    if request.task == "inpaint":
        region = box if box is not None else mask
        cells = module.edit_cells(region)
        out = module.inpaint(images, region, labels, **kwargs)
    elif request.task == "outpaint":
        x0, y0, x1, y1 = box
        top, left = request.get("offset", (y0, x0))
        kept = (left, top, left + x1 - x0, top + y1 - y0)  # where the box goes on the canvas
        cells = ~module.edit_cells(kept)
        out = module.outpaint(images[..., y0:y1, x0:x1], None, (top, left), labels, **kwargs)
        placed = torch.zeros_like(images)  # "before": the canvas the model reads (outpaint's fill 0)
        placed[..., kept[1] : kept[3], kept[0] : kept[2]] = images[..., y0:y1, x0:x1]
        images = placed
    else:
        cells = class_edit_token_mask(box, module.image_size, module.grid)
        target = torch.full((len(images),), request.get("target"), dtype=torch.long)
        out = module.class_edit(images, box, target, composite=request.get("composite", True), **kwargs)
    after, steps = out if progression else (out, None)
    masked = blurred_composite(torch.full_like(images, MASK_GREY), images, cells, radius=0)
    return images, masked, after.cpu(), None if steps is None else [s.cpu() for s in steps]


def _save(images: Tensor, path: Path, columns: int) -> None:
    from torchvision.utils import make_grid

    from lightning_mim.callbacks.pictures import grid_to_pil

    grid_to_pil(make_grid(images.float().cpu(), nrow=columns, padding=2, pad_value=1.0)).save(path)


def write_pictures(out: Path, names: Sequence[str], before: Tensor, masked: Tensor, after: Tensor, steps: list[Tensor] | None) -> None:
    """`<name>.png` per image (before | mask | after), `<name>_steps.png` with steps (mask, steps, after)."""
    for i, name in enumerate(names):
        _save(torch.stack([before[i], masked[i], after[i]]), out / f"{name}.png", 3)
        if steps is not None:
            row = [masked[i], *(s[i] for s in steps), after[i]]
            _save(torch.stack(row), out / f"{name}_steps.png", len(row))


def overview(before: Tensor, masked: Tensor, after: Tensor, block: int = BLOCK) -> Tensor:
    """Rows before / mask / after, `block` images a row, blocks stacked (white where a block is short)."""
    rows = []
    for start in range(0, len(before), block):
        for pictures in (before, masked, after):
            chunk = pictures[start : start + block]
            pad = torch.ones(block - len(chunk), *chunk.shape[1:]) if len(before) > block else chunk[:0]
            rows.append(torch.cat([chunk, pad]))
    return torch.cat(rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    status = usage_status(argv, __doc__)
    if status is not None:
        return status
    try:
        request = parse_request(argv)
        cfg = base_config(request.ckpt)
        model = editable(cfg, request.shown["ckpt"])
        check_request(request, model)
    except ConfigError as err:
        return report_config_error(err)
    filter_known_noise()
    out = request.get("out") or Path(os.environ.get("LIGHTNING_MIM_HOME", DEFAULT_HOME)) / "edits" / request.task
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = load_module(cfg, request.ckpt).to(device)
    generator = torch.Generator(device=device).manual_seed(int(request.get("seed", 0)))
    mask = region_mask(request.get("mask"), model.image_size) if "mask" in request.values else None
    collected: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, len(request.inputs), BATCH):
        paths = request.inputs[start : start + BATCH]
        labels = batch_labels(request, paths, model.num_classes)
        images = load_images(paths, model.image_size)
        before, masked, after, steps = edit_batch(module, request, images, labels, generator, mask)
        write_pictures(out, [p.stem for p in paths], before, masked, after, steps)
        collected.append((before, masked, after))
    before, masked, after = (torch.cat(parts) for parts in zip(*collected))
    _save(overview(before, masked, after), out / "edits.png", min(BLOCK, len(before)))
    files = "<name>.png, <name>_steps.png" if request.get("progression") else "<name>.png"
    print(f"{request.task}: {len(before)} image(s) -> {out} (edits.png: all of them; {files}: before | mask | after)")
    return 0


def batch_labels(request: EditRequest, paths: Sequence[Path], num_classes: int) -> Tensor | None:
    """The classes to condition inpaint / outpaint on: `label`, else each image's `.cls` file, else none.
    Images without a class when others have one get the model's "no class" (MaskGIT) -> all or none."""
    if request.task == "class_edit" or num_classes == 0:
        return None
    if "label" in request.values:
        return torch.full((len(paths),), request.get("label"), dtype=torch.long)
    found = [sidecar_label(p) for p in paths]
    if any(label is None for label in found):
        return None
    return torch.tensor(found, dtype=torch.long)


if __name__ == "__main__":
    sys.exit(main())

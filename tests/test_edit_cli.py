"""`python -m lightning_mim.edit`: the pictures it writes, and bad input refused in one line (exit 2) before
the checkpoint is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_module
from lightning_mim.editing import class_edit_token_mask
from lightning_mim.orchestration.edit import load_images, main
from lightning_mim.orchestration.evaluate import base_config, load_module

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SIZE, CELL, PAD = 16, 2, 2  # test_maskgit_module's tiny MaskGIT at 16 px: f = 2, 3 classes; make_grid's padding
MASKGIT = "lightning_mim.modules.maskgit.MaskGITModule"


def write_run(run_dir: Path, model: dict, checkpoint=None) -> Path:
    """A run directory as training leaves it: config.yaml and checkpoints/last.ckpt (`checkpoint`: a module
    to save, or None for an archive that looks like a checkpoint but cannot be read as one)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    OmegaConf.save({"model": model}, run_dir / "config.yaml")
    if checkpoint is None:
        import zipfile

        with zipfile.ZipFile(ckpt, "w") as archive:  # passes the up-front file check; loading it would fail
            archive.writestr("archive/data.pkl", b"reading it would fail")
        return ckpt
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=run_dir)
    trainer.strategy.connect(checkpoint)
    trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints: a tiny MaskGIT, the same config over an unreadable file, a continuous-input MAGE-C and a
    tokenizer (both unreadable files: they must be refused from their config alone)."""
    from test_maskgit_module import make

    root = tmp_path_factory.mktemp("edit-runs")
    module = make(image_size=SIZE)
    model = {"_target_": MASKGIT, **OmegaConf.to_container(OmegaConf.create(dict(module.hparams)))}
    mage_c = {"_target_": "lightning_mim.modules.mage.MAGEModule", "arch": {"input_mode": "continuous"}, "contrastive": True}
    return {
        "maskgit": write_run(root / "maskgit", model, module),
        "broken": write_run(root / "broken", model),
        "mage_c": write_run(root / "mage_c", mage_c),
        "tokenizer": write_run(root / "tokenizer", {"_target_": "lightning_mim.modules.tokenizer.TokenizerModule"}),
    }


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Three 24 px images (resized to 16 px by the command) with `.cls` files, as an extracted shard has."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"digit_{i}.png")
        (folder / f"digit_{i}.cls").write_text(str(i))
    return folder


def panels(path: Path, count: int) -> list[np.ndarray]:
    """The `count` SIZE x SIZE pictures of a one-row grid file (make_grid layout)."""
    grid = np.asarray(Image.open(path))
    assert grid.shape == (SIZE + 2 * PAD, count * (SIZE + PAD) + PAD, 3), grid.shape
    return [grid[PAD : PAD + SIZE, PAD + i * (SIZE + PAD) : PAD + i * (SIZE + PAD) + SIZE] for i in range(count)]


def uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_inpaint_writes_before_mask_after_and_the_progression(runs, digits, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"ckpt={runs['maskgit']}", f"input={digits}", "task=inpaint", "box=4,4,12,10", f"out={out}", "progression=true"]
    assert main(args) == 0
    assert "inpaint: 3 image(s)" in capsys.readouterr().out
    names = [f"digit_{i}" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["edits.png", *(f"{n}.png" for n in names), *(f"{n}_steps.png" for n in names)])
    module = load_module(base_config(runs["maskgit"]), runs["maskgit"])
    images = load_images(sorted(digits.glob("*.png")), SIZE)
    reconstruction = uint8(module.tokenizer.decode_indices(module.tokenizer.encode_to_indices(images)))
    inside = module.edit_cells((4, 4, 12, 10)).repeat_interleave(CELL, 0).repeat_interleave(CELL, 1).numpy()
    for i, name in enumerate(names):
        before, mask, after = panels(out / f"{name}.png", 3)
        assert np.array_equal(before, uint8(images)[i])
        assert (mask[inside] == 128).all() and np.array_equal(mask[~inside], before[~inside])
        assert np.array_equal(after[~inside], reconstruction[i][~inside])
        assert not np.array_equal(after[inside], reconstruction[i][inside])
        steps = panels(out / f"{name}_steps.png", 4 + 2)  # mask, decode.steps = 4 steps, after
        assert np.array_equal(steps[0], mask) and np.array_equal(steps[-1], after)
    overview = np.asarray(Image.open(out / "edits.png"))  # rows before / mask / after, one column per image
    assert overview.shape == (3 * (SIZE + PAD) + PAD, 3 * (SIZE + PAD) + PAD, 3)


@pytest.mark.parametrize(
    "task_args, regenerated",
    [
        (["task=inpaint", "mask=MASK", "label=1"], lambda: torch.arange(8).lt(3)[:, None] & torch.arange(8).lt(3)),  # white 6x6 px
        (["task=outpaint", "box=0,0,8,16", "offset=0,8"], lambda: ~torch.arange(8).ge(4).expand(8, 8)),  # kept: right half
        (["task=class_edit", "box=4,4,12,12", "target=2", "limit=2"], lambda: class_edit_token_mask((4, 4, 12, 12), SIZE, 8)),
    ],
)
def test_mask_outpaint_and_class_edit(runs, digits, tmp_path, task_args, regenerated):
    out, mask = tmp_path / "out", np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask[:6, :6] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    task_args = [a.replace("MASK", str(tmp_path / "mask.png")) for a in task_args]
    assert main([f"ckpt={runs['maskgit']}", f"input={digits}", f"out={out}", *task_args]) == 0
    count = 2 if "limit=2" in task_args else 3
    assert len(list(out.glob("digit_*.png"))) == count
    _, mask, _ = panels(out / "digit_0.png", 3)
    grey = regenerated().repeat_interleave(CELL, 0).repeat_interleave(CELL, 1).numpy()
    assert (mask[grey] == 128).all() and not (mask[~grey] == 128).all()


BAD = [
    (["task=paint"], "task=paint: must be one of inpaint, outpaint, class_edit"),
    (["task=inpaint", "box=0,0,40,40"], "box=0,0,40,40: must be x0,y0,x1,y1 with 0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16"),
    (["task=inpaint", "box=[0,0,8]"], "box=[0,0,8]: must be 4 integers"),
    (["task=inpaint"], "box: task=inpaint needs box=x0,y0,x1,y1 or mask=IMAGE"),
    (["task=class_edit", "box=4,4,12,12", "target=7"], "target=7: must be a class of the checkpoint: 0..2"),
    (["task=class_edit", "box=4,4,12,12"], "target: is required for task=class_edit"),
    (["task=outpaint", "box=1,0,8,16"], "box=1,0,8,16: must lie on the token grid for task=outpaint: multiples of 2 px"),
    (["task=outpaint", "box=0,0,8,16", "target=1"], "target=1: applies to task=class_edit only"),
    (["task=inpaint", "box=0,0,8,8", "label=5"], "label=5: must be a class of the checkpoint: 0..2"),
    (["task=inpaint", "box=0,0,8,8", "decode.steps=0"], "decode.steps=0: must be >= 1"),
    (["task=inpaint", "box=0,0,8,8", "boxx=1"], "boxx=1: unknown key; valid: ckpt, input, task, box"),
    (["task=inpaint", "box=0,0,8,8", "input=nowhere"], "input=nowhere: must be an image file or a folder with images"),
    (["task=inpaint", "mask=BLACK"], "mask=BLACK: has no white pixel (white = re-generate)"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[a[-1] for a, _ in BAD])
def test_bad_input_is_refused_in_one_line_before_the_checkpoint_is_read(runs, digits, tmp_path, capsys, args, message):
    out, black = tmp_path / "out", tmp_path / "black.png"
    Image.new("RGB", (24, 24)).save(black)
    args, message = [a.replace("BLACK", str(black)) for a in args], message.replace("BLACK", str(black))
    # the checkpoint file is unreadable: had the command got as far as loading it, it would fail otherwise
    assert main([f"ckpt={runs['broken']}", f"input={digits}", f"out={out}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "run, message",
    [
        ("mage_c", "a continuous-input MAGE (model.arch.input_mode=continuous) cannot edit"),
        ("tokenizer", "a TokenizerModule checkpoint cannot edit; editing needs a MaskGIT or MAGE checkpoint"),
    ],
)
def test_checkpoints_that_cannot_edit_are_refused(runs, digits, capsys, run, message):
    assert main([f"ckpt={runs[run]}", f"input={digits}", "task=inpaint", "box=0,0,8,8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ckpt={runs[run]}: {message}") and len(err.strip().splitlines()) == 1, err


def test_the_command_exits_2_with_one_line(runs, digits, tmp_path):
    proc = run_module(
        "lightning_mim.edit", [f"ckpt={runs['broken']}", f"input={digits}", "task=class_edit", "box=0,0,8,8", "target=9"],
        tmp_path, check=False, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: target=9: must be a class of the checkpoint: 0..2", proc.stderr

"""Bad input, class by class and entry point by entry point: one line naming the key and the value,
exit status 2, and nothing written to the home (no dataset, tokenizer, MLflow or Optuna store)."""

from __future__ import annotations

import pytest
from conftest import run_module

# (class of bad input, entry point, arguments, words the one line must hold); {tmp} is a temporary
# directory holding `empty.ckpt` (0 bytes) and `damaged.ckpt` (not a PyTorch archive)
TABLE = [
    ("wrong type", "train", ["decode.steps=true"], "decode.steps=True: must be an integer"),
    ("wrong type", "sweep", ["schedule=cosine,linear", "decode.steps='8'"], "decode.steps=8: must be an integer"),
    ("out of range", "train", ["trainer.devices=0"], "trainer.devices=0: must be >= 1"),
    ("out of range", "sweep", ["schedule=cosine,linear", "data.batch_size=0"], "data.batch_size=0: must be >= 1"),
    ("non-finite", "train", ["model.optim.lr=inf"], "model.optim.lr=inf: must be a finite number"),
    ("unknown key", "train", ["decode.stepz=8"], "decode.stepz"),
    ("unknown key", "evaluate", ["ckpt={tmp}/run/checkpoints/model.ckpt", "decode.stepz=8"], "decode.stepz=8: no such setting"),
    ("unknown choice", "train", ["schedule=cosin"], "unknown schedule 'cosin'"),
    ("unknown choice", "train", ["model.optim.name=nope"], "model.optim.name=nope: must be one of adam, adamw"),
    ("unknown choice", "train", ["trainer.precision=abc"], "trainer.precision=abc: must be one of"),
    ("unknown choice", "train", ["evaluation.split=nope"], "evaluation.split=nope: must be one of train, val, test"),
    ("inconsistent pair", "train", ["experiment=digits_mage", "ratio=uniform", "ratio.low=0.9", "ratio.high=0.1"],
     "ratio.low=0.9: must be <= ratio.high=0.1"),
    ("inconsistent pair", "sweep", ["transformer.width=choice(128,100)", "transformer.heads=choice(4,3)", "sweep.n_trials=2"],
     "must be divisible by transformer.heads=3"),
    ("missing file", "train", ["tokenizer.ckpt={tmp}/nowhere.ckpt"], "tokenizer.ckpt={tmp}/nowhere.ckpt: must be an existing checkpoint file"),
    ("missing file", "evaluate", ["ckpt={tmp}/nowhere.ckpt"], "ckpt={tmp}/nowhere.ckpt: no such checkpoint file"),
    ("missing file", "train", ["--config={tmp}/nowhere.yaml"], "config={tmp}/nowhere.yaml: no such file"),
    ("damaged file", "evaluate", ["ckpt={tmp}/empty.ckpt"], "ckpt={tmp}/empty.ckpt: not a checkpoint"),
    ("damaged file", "evaluate", ["ckpt={tmp}/damaged.ckpt"], "ckpt={tmp}/damaged.ckpt: not a checkpoint"),
    ("bad search space", "sweep", ["model.optim.lr=interval(1e-2,1e-4)", "sweep.n_trials=2"], "interval bounds must be increasing"),
    ("unknown choice", "sweep", ["sweep=ratios", "sweep.secondary=val/fid_domain:down:1.0"],
     "sweep.secondary=val/fid_domain:down:1.0: val/fid_domain's direction 'down' must be minimize or maximize"),
    ("inconsistent pair", "sweep", ["sweep=ratios", "sweep.seeds=auto"], "sweep.secondary=val/fid_domain:minimize:1: with sweep.seeds=auto the rounds add seeds"),
    ("bad grid point", "sweep", ["schedule=cosine,linear", "seed=1,2", "decode.steps=-1", "--prepare-only"],
     "grid point schedule=cosine seed=1: decode.steps=-1: must be >= 1"),
    ("bad grid point", "sweep", ["schedule=cosine,linear", "seed=0,-1"], "seed=-1: must be >= 0"),
    ("out of range", "tokenize", ["--shards", "{tmp}", "--tokenizer", "{tmp}/run/checkpoints/model.ckpt", "--out", "{tmp}/tokens",
                                  "--copies", "0"], "--copies=0: must be >= 1"),
    ("wrong type", "tokenize", ["--shards", "{tmp}", "--tokenizer", "{tmp}/run/checkpoints/model.ckpt", "--out", "{tmp}/tokens",
                                "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    ("missing file", "tokenize", ["--shards", "{tmp}/nowhere", "--tokenizer", "{tmp}/run/checkpoints/model.ckpt", "--out", "{tmp}/tokens"],
     "--shards={tmp}/nowhere: no such image-shard directory"),
    ("damaged file", "tokenize", ["--shards", "{tmp}", "--tokenizer", "{tmp}/empty.ckpt", "--out", "{tmp}/tokens"],
     "--tokenizer={tmp}/empty.ckpt: not a checkpoint"),
    ("out of range", "data.prepare", ["digits", "--out", "{tmp}/shards", "--shard-size", "0"], "shard_size must be >= 1, got 0"),
    ("missing file", "data.prepare", ["imagefolder", "{tmp}/nowhere", "--out", "{tmp}/shards"], "image folder not found: {tmp}/nowhere"),
    ("unknown choice", "data.prepare", ["digits", "--out", "{tmp}/shards", "--interpolation", "cubic"], "argument --interpolation: invalid choice"),
    ("out of range", "edit", ["ckpt={tmp}/run/checkpoints/model.ckpt", "input={tmp}/image.png", "task=inpaint", "box=8,8,24,24",
                              "decode.steps=0"], "decode.steps=0: must be >= 1"),
    ("unknown key", "edit", ["ckpt={tmp}/run/checkpoints/model.ckpt", "input={tmp}/image.png", "task=inpaint", "box=8,8,24,24",
                             "decode.stepz=3"], "unknown decode setting(s) ['stepz']"),
    ("unknown choice", "edit", ["ckpt={tmp}/run/checkpoints/model.ckpt", "input={tmp}/image.png", "task=paint", "box=8,8,24,24"],
     "task=paint: must be one of inpaint, outpaint, class_edit"),
    ("damaged file", "edit", ["ckpt={tmp}/empty.ckpt", "input={tmp}/image.png", "task=inpaint", "box=8,8,24,24"],
     "ckpt={tmp}/empty.ckpt: not a checkpoint"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-input")
    (directory / "empty.ckpt").write_bytes(b"")
    (directory / "damaged.ckpt").write_bytes(b"PK\x03\x04 cut off")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(directory / "image.png")
    import zipfile

    from lightning_mim.orchestration.config import compose
    from lightning_mim.orchestration.protocol import write_config

    (directory / "run" / "checkpoints").mkdir(parents=True)
    write_config(compose([f"paths.home={directory}"]), directory / "run" / "config.yaml")  # a run's saved config
    with zipfile.ZipFile(directory / "run" / "checkpoints" / "model.ckpt", "w") as archive:  # never loaded
        archive.writestr("archive/data.pkl", b"")
    return directory


@pytest.mark.parametrize("kind, entry, args, words", TABLE, ids=[f"{t[1]}: {t[0]}: {' '.join(t[2])}" for t in TABLE])
def test_bad_input_is_refused_in_one_line_before_any_work(kind, entry, args, words, files, tmp_path):
    home = tmp_path / "home"
    args = [a.replace("{tmp}", str(files)) for a in args]
    proc = run_module(f"lightning_mim.{entry}", args, home, check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert words.replace("{tmp}", str(files)) in lines[0], lines[0]
    assert not home.exists(), sorted(p.name for p in home.iterdir())  # nothing touched
    assert not any((files / name).exists() for name in ("tokens", "shards"))  # no output begun

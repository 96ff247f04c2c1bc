"""README.md stays true: its ```python blocks run as written, and the files, docs sections and modules it names exist.

Each ```python block runs as a reader would run it: the whole block, imports included, in a fresh
namespace, from a fresh working directory with `LIGHTNING_MIM_HOME` there (`lmim/`, the default
`paths.home`). A block that needs a file a reader has first (an official checkpoint they downloaded, a
run they trained) finds it built by `ARTIFACTS` below, at the path the block names: the official
checkpoints with the official names and shapes (from tests/reference/, docs/FIDELITY.md "Checkpoint
layouts") but zero-stride zeros, so the files are a few kB and load in well under a second; our own
checkpoint as a tiny stage-2 checkpoint of the `tokenizer=tiny` architecture. No block is skipped:
one naming a file nobody builds fails with FileNotFoundError — add its builder here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
REFERENCE = REPO / "tests" / "reference"

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number of the code, code) of every fenced block."""
    return [(m.group(1).strip(), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)]


def python_blocks() -> list[tuple[int, str]]:
    return [(line, code) for lang, line, code in fenced_blocks(README.read_text(encoding="utf-8")) if lang == "python"]


# --------------------------------------------------------------------------------------------------
# the files README's snippets expect a reader to have


def _zeros_like_shape(shape, dtype=None):
    """A tensor of `shape` that takes one element of storage (stride 0): tiny on disk, loads instantly."""
    import torch

    return torch.zeros((), dtype=dtype or torch.float32).expand(*shape)


def _reference(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((REFERENCE / name).read_text()).items()}


def official_tokenizer(path: Path) -> None:
    """MAGE's `vqgan_jax_strongaug.ckpt`: the bare official state dict (names and shapes from tests/reference)."""
    import torch

    torch.save({k: _zeros_like_shape(s) for k, s in _reference("vqgan_f16_keys.json").items()}, path)


def official_mage_b(path: Path) -> None:
    """An official MAGE ViT-B pre-training checkpoint: `model` (with the frozen tokenizer under `vqgan.`)."""
    import torch

    model = {k: _zeros_like_shape(s) for k, s in _reference("mage_vitb_keys.json").items()}
    model["token_emb.position_ids"] = torch.arange(257)[None]
    model.update({f"vqgan.{k}": _zeros_like_shape(s) for k, s in _reference("vqgan_f16_keys.json").items()})
    torch.save({"model": model, "epoch": 1599}, path)


def our_stage2_run(path: Path) -> None:
    """`lmim/runs/myrun/checkpoints/last.ckpt` of a stage-2 run: Lightning's layout with plain hyper-parameters
    (`tokenizer.arch` as in conf/tokenizer/tiny.yaml) and the frozen tokenizer under `tokenizer.`."""
    import torch
    from omegaconf import OmegaConf

    from lightning_mim.checkpoints.vqgan import build_vqgan

    arch = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "tokenizer" / "tiny.yaml").arch, resolve=True)
    vqgan = build_vqgan(arch)
    state = {f"tokenizer.{k}": v for k, v in vqgan.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"hyper_parameters": {"tokenizer": {"arch": arch, "ckpt": None}}, "state_dict": state, "global_step": 600},
        path,
    )


# path relative to the snippet's working directory -> builder
ARTIFACTS: dict[str, Callable[[Path], None]] = {
    "vqgan_jax_strongaug.ckpt": official_tokenizer,
    "mage-vitb.pth": official_mage_b,
    "lmim/runs/myrun/checkpoints/last.ckpt": our_stage2_run,
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A directory holding every file of ARTIFACTS, built once; each snippet gets a copy of it."""
    root = tmp_path_factory.mktemp("readme-artifacts")
    for rel, build in ARTIFACTS.items():
        build(root / rel)
    return root


# --------------------------------------------------------------------------------------------------
# the tests


def test_readme_has_python_snippets():
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block (this file would test nothing)"
    assert any("from lightning_mim.checkpoints import" in code for _, code in blocks)


@pytest.mark.parametrize("line, code", python_blocks(), ids=[f"README.md:{line}" for line, _ in python_blocks()])
def test_python_snippet_runs_as_written(line, code, artifacts, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(artifacts, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("LIGHTNING_MIM_HOME", str(work / "lmim"))
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")  # tracebacks point at README's lines
    exec(compiled, {"__name__": "__main__"})


def test_checkpoint_loaders_are_exported():
    from lightning_mim.checkpoints import load_mage, load_tokenizer, load_vqgan
    from lightning_mim.checkpoints.mage import load_mage as mage_loader
    from lightning_mim.checkpoints.vqgan import load_tokenizer as tokenizer_loader

    assert load_mage is mage_loader and load_tokenizer is tokenizer_loader and callable(load_vqgan)


def test_readme_snippet_models_are_what_they_claim(artifacts, monkeypatch):
    """The snippet's results, checked: the official ViT-B sizes and tokenizer, and our tiny tokenizer."""
    from lightning_mim.checkpoints import load_mage, load_tokenizer, load_vqgan

    monkeypatch.chdir(artifacts)
    tokenizer = load_tokenizer("vqgan_jax_strongaug.ckpt")
    assert sum(p.numel() for p in tokenizer.parameters()) == 54_515_587  # docs/FIDELITY.md "Checkpoint layouts"
    mage, vqgan_state = load_mage("mage-vitb.pth", size="base")
    assert sum(t.numel() for t in mage.state_dict().values()) == 144_896_745
    assert vqgan_state is not None and len(vqgan_state) == 168
    ours = load_vqgan("lmim/runs/myrun/checkpoints/last.ckpt")
    assert not ours.training


# --------------------------------------------------------------------------------------------------
# what README names exists

# `path` in backticks or as a link target, under a folder of the repository (not `lmim/...`: run outputs)
REPO_PATH = re.compile(r"(?:`|\]\()((?:lightning_mim|conf|tests|docs|notebooks|benchmarks|sweeps)/[\w./-]+?)(?:`|\))")
DOC_CITATION = re.compile(r"(docs/[\w-]+\.md) \"([^\"]+)\"")
MODULE_COMMAND = re.compile(r"python -m (lightning_mim(?:\.\w+)+)")


def test_paths_named_in_readme_exist():
    text = README.read_text(encoding="utf-8")
    named = sorted(set(REPO_PATH.findall(text)))
    assert named, "no repository path found in README.md (pattern broken?)"
    placeholder = re.compile(r"^(NAME|PATH|<[^>]*>)(\.\w+)?$")  # `sweeps/NAME.yaml`
    named = [p for p in named if not any(placeholder.match(part) for part in p.split("/"))]
    missing = [p for p in named if not (REPO / p.rstrip("/")).exists()]
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_doc_sections_cited_in_readme_exist():
    text = README.read_text(encoding="utf-8")
    bad = []
    for doc, heading in sorted(set(DOC_CITATION.findall(text))):
        path = REPO / doc
        if not path.is_file():
            bad.append(f'{doc} "{heading}": no such file')
            continue
        headings = {h.strip() for h in re.findall(r"^#+\s+(.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)}
        if heading not in headings:
            bad.append(f'{doc} "{heading}": no such heading')
    assert not bad, "README.md cites missing doc sections:\n  " + "\n  ".join(bad)


def test_commands_in_readme_name_existing_modules():
    text = README.read_text(encoding="utf-8")
    modules = sorted(set(MODULE_COMMAND.findall(text)))
    assert "lightning_mim.train" in modules
    missing = [m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, f"README.md runs modules that do not exist: {missing}"


def test_readme_shows_no_scratch_paths():
    """Quoted outputs show paths a reader has (`lmim/...`), not the absolute paths of the machine they came from."""
    text = README.read_text(encoding="utf-8")
    found = sorted(set(re.findall(r"(?:/tmp/|/root/|/work/|/home/\w+/|/scratch/|/Users/\w+/)[^\s`)'\"]*", text)))
    assert not found, f"README.md quotes machine-specific paths: {found}"

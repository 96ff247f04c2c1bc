"""Stage reuse: artifacts keyed by a hash of the config that produced them.

A stage-2 run (MaskGIT, MAGE) needs a trained tokenizer. When `tokenizer.ckpt` is null, the tokenizer
is trained by the experiment named in `tokenizer.train_experiment` on the same data and tokenizer
choices, and cached under `paths.cache_dir/stages/tokenizer-<hash>/`. Every run and every sweep trial
whose tokenizer config hashes the same reuses it. Training happens under a file lock (two sweep
workers never train the same tokenizer twice) and resumes from its own last.ckpt if it was killed;
a `done.json` written last marks the artifact complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from lightning_mim.orchestration.config import compose, section_hash
from lightning_mim.locks import file_lock

DONE_FILE = "done.json"
# Overrides of the stage-2 run that also shape the tokenizer it needs (and so enter its cache key).
TOKENIZER_OVERRIDE_PREFIXES = ("data.", "tokenizer.", "trainer.accelerator", "trainer.devices", "trainer.precision")
# Keys that do not change what a stage computes.
NON_SEMANTIC_KEYS = ("paths", "run_name", "experiment_name", "ckpt_path", "logger", "overrides", "choices", "callbacks")


def is_stage2(cfg: DictConfig) -> bool:
    return "tokenizer" in cfg.model


def prepare_stage_inputs(cfg: DictConfig) -> None:
    """Fill in what the run's model needs from earlier stages (today: the tokenizer checkpoint)."""
    if not is_stage2(cfg):
        return
    ckpt = cfg.tokenizer.get("ckpt")
    if not ckpt:
        cfg.tokenizer.ckpt = str(ensure_tokenizer(cfg))
    elif not Path(str(ckpt)).expanduser().is_file():
        raise FileNotFoundError(f"tokenizer.ckpt={ckpt}: no such checkpoint file")


def tokenizer_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the run that trains the tokenizer a stage-2 config needs."""
    choices = cfg.get("choices") or {}
    overrides = [f"experiment={cfg.tokenizer.train_experiment}", f"paths.home={cfg.paths.home}"]
    for group in ("data", "tokenizer", "trainer", "logger"):
        if group in choices:
            overrides.append(f"{group}={choices[group]}")
    overrides += [o for o in cfg.get("overrides") or [] if o.startswith(TOKENIZER_OVERRIDE_PREFIXES)]
    overrides = [o for o in overrides if not o.startswith("tokenizer.ckpt")]
    return compose(overrides)


def stage_key(cfg: DictConfig) -> str:
    semantic = {k: v for k, v in cfg.items() if k not in NON_SEMANTIC_KEYS}
    return section_hash(semantic)


def ensure_tokenizer(cfg: DictConfig) -> Path:
    """Path of a trained tokenizer for `cfg`, training it once if no cached one exists."""
    from lightning_mim.orchestration.train import run

    if not cfg.tokenizer.get("train_experiment"):
        raise ValueError(
            f"tokenizer '{(cfg.get('choices') or {}).get('tokenizer', '?')}' has no checkpoint and no train_experiment: "
            "set tokenizer.ckpt=/path/to/weights (e.g. the official vqgan_jax_strongaug.ckpt for maskgit_f16)"
        )
    tok_cfg = tokenizer_run_config(cfg)
    key = stage_key(tok_cfg)
    stage_dir = Path(cfg.paths.cache_dir) / "stages" / f"tokenizer-{key}"
    final = stage_dir / "tokenizer.ckpt"
    with file_lock(stage_dir.with_suffix(".lock")):
        done = stage_dir / DONE_FILE
        if done.is_file() and final.is_file():
            return final
        print(f"[lightning-mim] training tokenizer {key} (cached in {stage_dir})", file=sys.stderr)
        tok_cfg.run_name = f"tokenizer-{key}"
        tok_cfg.paths.output_dir = str(stage_dir)
        tok_cfg.ckpt_path = "last"  # a killed tokenizer run resumes instead of starting over
        result = run(tok_cfg)
        shutil.copyfile(result["checkpoint"], final)
        done.write_text(json.dumps({"key": key, "metrics": result["metrics"]}, indent=2))
    return final

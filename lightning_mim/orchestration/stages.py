"""The stage cache: artifacts keyed by a hash of the config that produced them, made once.

`cached(kind, cfg, produce)` is the one implementation, used for every stage:
- the tokenizer a stage-2 run needs (`ensure_tokenizer`): when `tokenizer.ckpt` is null it is trained
  by the experiment named in `tokenizer.train_experiment`, on the same data and tokenizer choices,
  under `paths.cache_dir/stages/tokenizer-<hash>/`; every run and sweep trial whose tokenizer config
  hashes the same reuses it;
- a sweep's trained stage-2 models (`orchestration.sweep`): trials that differ only in inference-only
  settings (`decode.*`) evaluate one checkpoint instead of retraining.

Production runs under a file lock (two workers never produce the same stage twice; the second waits
and reuses), a killed production resumes from its own last.ckpt (producers train with
`ckpt_path=last` into the stage directory), and a `done.json` record written last marks the artifact
complete. A producer that raises (a failed or pruned training) leaves no record: the next caller
produces again.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lightning_mim.locks import file_lock
from lightning_mim.orchestration.config import NON_SEMANTIC_KEYS, compose, section_hash

DONE_FILE = "done.json"
# What a stage-2 config hands the run that trains its tokenizer, per section: the images (the data
# section but for how the stage-2 run batches, loads and seeds them), the tokenizer's own section, and
# where it runs.
DATA_LOADING_KEYS = ("batch_size", "val_batch_size", "num_workers", "batches_per_epoch", "val_batches", "shuffle_buffer", "seed")
TOKENIZER_INPUTS: dict[str, Callable[[str], bool]] = {
    "data": lambda key: key not in DATA_LOADING_KEYS,
    "tokenizer": lambda key: key != "ckpt",
    "trainer": lambda key: key in ("accelerator", "devices", "precision"),
}
Train = Callable[[DictConfig], dict[str, Any]]  # `orchestration.training.run`: a config -> its result


def stage_key(cfg: DictConfig) -> str:
    """Hash of everything in `cfg` that changes what a stage computes (not where it is recorded): the
    sections as written, interpolations unresolved, so a key does not depend on where the home is."""
    semantic = {k: v for k, v in cfg.items() if k not in NON_SEMANTIC_KEYS}
    return section_hash(semantic)


def stage_dir(kind: str, cfg: DictConfig) -> Path:
    """Where stage `kind` of `cfg` lives: `paths.cache_dir/stages/<kind>-<key>/`."""
    return Path(cfg.paths.cache_dir) / "stages" / f"{kind}-{stage_key(cfg)}"


def cached(kind: str, cfg: DictConfig, produce: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(record, produced_now) of stage `kind` for `cfg`.

    `produce(directory)` makes the artifact inside `directory` and returns its record (JSON-able; a
    `checkpoint` entry names the artifact file). It runs at most once per key at a time (file lock);
    a record whose `checkpoint` file has gone missing counts as absent.
    """
    directory = stage_dir(kind, cfg)
    with file_lock(directory.with_suffix(".lock")):
        done = directory / DONE_FILE
        if done.is_file():
            record = json.loads(done.read_text())
            if not record.get("checkpoint") or Path(record["checkpoint"]).is_file():
                return record, False
        directory.mkdir(parents=True, exist_ok=True)
        record = produce(directory)
        done.write_text(json.dumps(record, indent=2))
        return record, True


def is_stage2(cfg: DictConfig) -> bool:
    return "tokenizer" in cfg.model


def ensure_earlier_stages(cfg: DictConfig, train: Train) -> None:
    """Fill in what the run's model needs from earlier stages (today: the tokenizer checkpoint),
    training it with `train` when the cache has none."""
    if not is_stage2(cfg):
        return
    ckpt = cfg.tokenizer.get("ckpt")
    if not ckpt:
        cfg.tokenizer.ckpt = str(ensure_tokenizer(cfg, train))
    elif not Path(str(ckpt)).expanduser().is_file():
        raise FileNotFoundError(f"tokenizer.ckpt={ckpt}: no such checkpoint file")


@functools.lru_cache(maxsize=8)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """`config.compose(overrides)`, once per process (a sweep driver derives a tokenizer config per trial)."""
    return compose(list(overrides))


def tokenizer_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the run that trains the tokenizer a stage-2 config `cfg` needs, derived from
    `cfg`'s own sections: the tokenizer's training recipe (the experiment `tokenizer.train_experiment`,
    with `cfg`'s choices of the data, tokenizer, trainer and logger groups), and from `cfg` itself what
    the tokenizer is trained on and as (`TOKENIZER_INPUTS`). So the tokenizer's cache key follows what
    the tokenizer computes: the images and its own settings, not the stage-2 model, nor how the stage-2
    run batches and seeds its data."""
    choices = cfg.get("choices") or {}
    overrides = [f"experiment={cfg.tokenizer.train_experiment}", f"paths.home={cfg.paths.home}", f"paths.cache_dir={cfg.paths.cache_dir}"]
    overrides += [f"{group}={choices[group]}" for group in ("data", "tokenizer", "trainer", "logger") if group in choices]
    tok_cfg = copy.deepcopy(_composed(tuple(overrides)))
    for section, keep in TOKENIZER_INPUTS.items():
        given = OmegaConf.to_container(cfg[section], resolve=False)  # interpolations stay: they resolve in tok_cfg
        tok_cfg[section] = OmegaConf.merge(tok_cfg[section], {k: v for k, v in given.items() if keep(k)})
    tok_cfg.tokenizer.ckpt = None
    return tok_cfg


def ensure_tokenizer(cfg: DictConfig, train: Train) -> Path:
    """Path of a trained tokenizer for `cfg`, trained once (by `train`) if no cached one exists."""
    if not cfg.tokenizer.get("train_experiment"):
        raise ValueError(
            f"tokenizer '{(cfg.get('choices') or {}).get('tokenizer', '?')}' has no checkpoint and no train_experiment: "
            "set tokenizer.ckpt=/path/to/weights (e.g. the official vqgan_jax_strongaug.ckpt for maskgit_f16)"
        )
    tok_cfg = tokenizer_run_config(cfg)
    key = stage_key(tok_cfg)

    def produce(directory: Path) -> dict[str, Any]:
        print(f"[lightning-mim] training tokenizer {key} (cached in {directory})", file=sys.stderr)
        tok_cfg.run_name = f"tokenizer-{key}"
        tok_cfg.paths.output_dir = str(directory)
        tok_cfg.ckpt_path = "last"  # a killed tokenizer run resumes instead of starting over
        result = train(tok_cfg)
        final = directory / "tokenizer.ckpt"
        shutil.copyfile(result["checkpoint"], final)
        return {"key": key, "metrics": result["metrics"], "checkpoint": str(final)}

    record, _ = cached("tokenizer", tok_cfg, produce)
    return Path(record["checkpoint"])

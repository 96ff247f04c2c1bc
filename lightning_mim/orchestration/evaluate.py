"""`python -m lightning_mim.evaluate ckpt=PATH decode.steps=4,8,12`: score one trained checkpoint at
several inference settings without retraining.

The run's own `config.yaml` (saved beside `checkpoints/`) is the base config; dotted overrides
(`decode.steps=8`, `evaluation.num_samples=1000`) are merged on top, and comma lists form a grid over
inference settings. Each setting is one MLflow run; a table is printed at the end. The sweep calls
this for trials that reuse a checkpoint trained by an earlier trial.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_mim.orchestration.config import ConfigError, compose, config_groups, flatten
from lightning_mim.orchestration.train import BOOKKEEPING_KEYS, PARENT_RUN_ENV, RUN_TAGS_ENV


def base_config(ckpt: Path) -> DictConfig:
    """The config the checkpoint was trained with (falls back to the defaults)."""
    saved = ckpt.parent.parent / "config.yaml"
    if saved.is_file():
        return OmegaConf.load(saved)
    print(f"note: no {saved}; evaluating with the default config", file=sys.stderr)
    return compose([])


def load_module(cfg: DictConfig, ckpt: Path, *, weights_only: bool = True):
    module_class = get_class(cfg.model._target_)
    return module_class.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=weights_only)


def evaluate_checkpoint(cfg: DictConfig, ckpt: Path, module=None, datamodule=None) -> dict[str, float]:
    """Generation metrics of `ckpt` with the decode settings in `cfg.decode`."""
    from lightning_mim.eval.generation import evaluate_generation

    module = module if module is not None else load_module(cfg, ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module.to(device)
    if datamodule is None:
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.prepare_data()
        datamodule.setup("validate")
    ev = cfg.evaluation
    decode = {k: v for k, v in OmegaConf.to_container(cfg.decode, resolve=True).items()}
    return evaluate_generation(
        module,
        datamodule,
        num_samples=int(ev.num_samples),
        extractor=list(ev.extractor),
        cache_dir=str(Path(cfg.paths.cache_dir) / "eval"),
        device=device,
        decode_overrides=decode,
        batch_size=int(ev.batch_size),
        split=str(ev.split),
        seed=int(ev.seed),
        inception_weights=ev.get("inception_weights"),
    )


def _log_to_mlflow(cfg: DictConfig, metrics: dict[str, float], run_name: str) -> str | None:
    if "tracking_uri" not in (cfg.get("logger") or {}):
        return None
    from mlflow.tracking import MlflowClient

    from lightning_mim.orchestration.tracking import ensure_experiment

    logger = cfg.logger
    client = MlflowClient(tracking_uri=logger.tracking_uri)
    experiment_id = ensure_experiment(logger.tracking_uri, logger.experiment_name, logger.artifact_location)
    tags = {"lightning_mim.role": "evaluation", **json.loads(os.environ.get(RUN_TAGS_ENV) or "{}")}
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = {k: str(v)[:250] for k, v in flatten(cfg).items() if not k.startswith(BOOKKEEPING_KEYS)}
    from mlflow.entities import Metric, Param

    items = list(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
    client.log_batch(run.info.run_id, metrics=[Metric(f"val/{k}", v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    args = dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a)
    if "ckpt" not in args:
        print("error: give ckpt=PATH (a stage-2 checkpoint)", file=sys.stderr)
        return 2
    ckpt = Path(args.pop("ckpt")).expanduser()
    if not ckpt.is_file():
        print(f"error: ckpt={ckpt}: no such checkpoint file", file=sys.stderr)
        return 2
    result_file = args.pop("result_file", None)
    groups = set(config_groups())
    # group choices (schedule=..., experiment=...) are training settings already in the saved config
    dotted = {k: v for k, v in args.items() if k not in groups}
    axes = {k: v.split(",") for k, v in dotted.items()}
    keys = sorted(axes)
    base = base_config(ckpt)
    module = load_module(base, ckpt)
    datamodule = None
    rows = []
    for values in itertools.product(*(axes[k] for k in keys)):
        setting = dict(zip(keys, values))
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in setting.items()]))
        if datamodule is None:
            datamodule = instantiate(cfg.data, _convert_="all")
            datamodule.prepare_data()
            datamodule.setup("validate")
        metrics = evaluate_checkpoint(cfg, ckpt, module=module, datamodule=datamodule)
        run_name = str(cfg.get("run_name") or "evaluate")
        _log_to_mlflow(cfg, metrics, run_name)
        rows.append(({k: v for k, v in setting.items() if len(axes[k]) > 1}, metrics))
    _print_table(rows)
    if result_file:
        Path(result_file).write_text(json.dumps({"metrics": {f"val/{k}": v for k, v in rows[-1][1].items()}}, indent=2))
    return 0


def _print_table(rows: list[tuple[dict[str, Any], dict[str, float]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = sorted({k for setting, _ in rows for k in setting})
    metric_names = sorted({m for _, metrics in rows for m in metrics if not m.startswith(("is_std", "kid_std"))})
    table = Table(title="evaluation")
    for column in [*keys, *metric_names]:
        table.add_column(column)
    for setting, metrics in rows:
        table.add_row(*(str(setting.get(k, "")) for k in keys), *(f"{metrics[m]:.4f}" for m in metric_names))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

"""`python -m lightning_mim.evaluate ckpt=PATH decode.steps=4,8,12`: score one trained checkpoint at
several inference settings without retraining.

The run's own `config.yaml` (saved beside `checkpoints/`) is the base config; dotted overrides
(`decode.steps=8`, `evaluation.num_samples=1000`) are merged on top, and comma lists form a grid over
inference settings. Each setting is one MLflow run; a table is printed at the end. The sweep calls
this for trials that reuse a checkpoint trained by an earlier trial; it then writes the last setting's
metrics as the trial's result (`orchestration.protocol`) into `paths.output_dir`.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_mim.orchestration.config import ConfigError, checkpoint_file, compose, config_groups, parse_overrides, report_config_error, usage_status
from lightning_mim.orchestration.noise import filter_known_noise
from lightning_mim.orchestration.protocol import TrialContext, objective_metric, read_config, write_progress, write_result
from lightning_mim.orchestration.schema import check_config
from lightning_mim.orchestration.tracking import ALIASES_KEY, alias_keys, ensure_experiment, environment_tags, run_params


def base_config(ckpt: Path) -> DictConfig:
    """The config the checkpoint was trained with (falls back to the defaults)."""
    saved = ckpt.parent.parent / "config.yaml"
    if saved.is_file():
        return OmegaConf.load(saved)
    print(f"note: no {saved}; evaluating with the default config", file=sys.stderr)
    return compose([])


def saved_alias_keys(cfg: DictConfig) -> set[str]:
    """The alias keys of a run's saved, resolved config: the list the training wrote into it
    (`tracking.ALIASES_KEY`); a config saved without one gets them by composing its overrides again."""
    if ALIASES_KEY in cfg:
        return set(cfg[ALIASES_KEY])
    try:
        return alias_keys(compose(list(cfg.get("overrides") or [])))
    except ConfigError:
        return set()


def load_module(cfg: DictConfig, ckpt: Path, *, weights_only: bool = True):
    module_class = get_class(cfg.model._target_)
    return module_class.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=weights_only)


def validation_datamodule(cfg: DictConfig):
    """The run's DataModule, set up for evaluation (built once per command, shared by every setting)."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def evaluate_checkpoint(cfg: DictConfig, module, datamodule) -> dict[str, float]:
    """Generation metrics of `module` with the decode settings in `cfg.decode` and `cfg.evaluation`
    (with `evaluation.second_draw`, also `<metric>_draw2`, as the training's callback reports them)."""
    import torch  # here, not at the top: bad input is refused before torch loads

    from lightning_mim.eval.generation import evaluate_generation, second_draw_seed
    from lightning_mim.settings import SECOND_DRAW_SUFFIX

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ev = cfg.evaluation

    def score(seed: int) -> dict[str, float]:
        return evaluate_generation(
            module.to(device),
            datamodule,
            num_samples=int(ev.num_samples),
            extractor=list(ev.extractor),
            cache_dir=str(Path(cfg.paths.cache_dir) / "eval"),
            device=device,
            decode_overrides=OmegaConf.to_container(cfg.decode, resolve=True),
            batch_size=int(ev.batch_size),
            split=str(ev.split),
            seed=seed,
            inception_weights=ev.get("inception_weights"),
        )

    metrics = score(int(ev.seed))
    if ev.get("second_draw"):
        metrics.update({f"{k}{SECOND_DRAW_SUFFIX}": v for k, v in score(second_draw_seed(int(ev.seed))).items()})
    return metrics


def _log_to_mlflow(cfg: DictConfig, metrics: dict[str, float], run_name: str, trial: TrialContext,
                   as_composed: bool = False) -> str | None:
    """One MLflow run of the setting `cfg` (`as_composed`: a config as composed, whose interpolations
    name its alias keys; otherwise a run's saved, resolved config)."""
    if "tracking_uri" not in (cfg.get("logger") or {}):
        return None
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    logger = cfg.logger
    client = MlflowClient(tracking_uri=logger.tracking_uri)
    experiment_id = ensure_experiment(logger.tracking_uri, logger.experiment_name, logger.artifact_location)
    tags = {"lightning_mim.role": "evaluation", **environment_tags(), **trial.tags}
    if trial.parent_run_id:
        tags["mlflow.parentRunId"] = trial.parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    aliases = alias_keys(cfg) if as_composed else saved_alias_keys(cfg)
    items = [(k, str(v)[:250]) for k, v in run_params(cfg, aliases).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
    logged = [Metric(f"val/{k}", v, 0, 0) for k, v in metrics.items()]
    objective = next((m for m in logged if m.key == trial.objective), None)
    if objective is not None:  # a sweep's objective first: MLflow's compare view opens on the first metric
        logged.insert(0, Metric(objective_metric(objective.key), objective.value, 0, 0))
    client.log_batch(run.info.run_id, metrics=logged)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def parse_arguments(argv: Sequence[str]) -> tuple[Path, str | None, dict[str, list[str]], set[str]]:
    """(checkpoint, result file or None, {config key: [values]}, the keys given as `+key=` additions)
    from `ckpt=PATH key=a,b ...` (Hydra's
    grammar; a comma list is a grid axis). Group choices (`schedule=...`) are skipped: they are training
    settings, already in the checkpoint's saved config."""
    groups = set(config_groups())
    ckpt = result_file = None
    axes: dict[str, list[str]] = {}
    added: set[str] = set()
    for override in parse_overrides(argv):
        key = override.key_or_group
        values = [str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override() else [
            override.get_value_element_as_str()
        ]
        if key == "ckpt":
            ckpt = values[0]
        elif key == "result_file":
            result_file = values[0]
        elif key not in groups:
            axes[key] = values
            if override.input_line.startswith("+"):
                added.add(key)
    if ckpt is None:
        raise ConfigError("give ckpt=PATH (a stage-2 checkpoint)")
    return checkpoint_file("ckpt", ckpt), result_file, axes, added


def unknown_keys(cfg: DictConfig, keys: Sequence[str]) -> list[str]:
    """The dotted `keys` that `cfg` (the checkpoint's config) does not have: a typo, not a setting."""
    missing = object()
    return [key for key in keys if OmegaConf.select(cfg, key, default=missing) is missing]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    status = usage_status(argv, __doc__)
    if status is not None:
        return status
    try:
        ckpt, result_file, axes, added = parse_arguments(argv)
        config_file = axes.pop("config", [None])[0]
        if config_file and axes:  # a sweep trial: its config as the driver built it, nothing to merge
            raise ConfigError(f"config={config_file}: give the config file or settings, not both ({', '.join(sorted(axes))})")
        keys = sorted(axes)
        base = read_config(config_file) if config_file else base_config(ckpt)
        for key in unknown_keys(base, [k for k in keys if k not in added]):
            raise ConfigError(f"{key}={','.join(axes[key])}: no such setting in the run's config (add one with +{key}=...)")
        settings = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
        configs = [OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in s.items()])) for s in settings]
        for cfg in configs:  # every setting, before the checkpoint is even loaded
            # the stage-2 checkpoint holds the tokenizer's weights: its training-time file may be gone
            check_config(OmegaConf.merge(cfg, {"tokenizer": {"ckpt": None}}))
    except ConfigError as err:
        return report_config_error(err)
    filter_known_noise()
    module = load_module(base, ckpt)
    trial = TrialContext.from_environment()
    datamodule = None
    rows = []
    for setting, cfg in zip(settings, configs):
        write_progress(trial.progress_file, "evaluation", setting=setting)
        datamodule = datamodule or validation_datamodule(cfg)
        metrics = evaluate_checkpoint(cfg, module, datamodule)
        _log_to_mlflow(cfg, metrics, str(cfg.get("run_name") or "evaluate"), trial, as_composed=bool(config_file))
        rows.append(({k: v for k, v in setting.items() if len(axes[k]) > 1}, metrics))
    _print_table(rows)
    if result_file:  # what the sweep driver reads back (orchestration.protocol)
        write_result(result_file, {"metrics": {f"val/{k}": v for k, v in rows[-1][1].items()}, "checkpoint": str(ckpt)})
    return 0


def _print_table(rows: list[tuple[dict[str, Any], dict[str, float]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = sorted({k for setting, _ in rows for k in setting})
    from lightning_mim.settings import SECOND_DRAW_SUFFIX

    shown = lambda m: not m.startswith(("is_std", "kid_std")) and not m.endswith(SECOND_DRAW_SUFFIX)  # noqa: E731
    metric_names = sorted({m for _, metrics in rows for m in metrics if shown(m)})  # second draws: in the result
    table = Table(title="evaluation")
    for column in [*keys, *metric_names]:
        table.add_column(column)
    for setting, metrics in rows:
        table.add_row(*(str(setting.get(k, "")) for k in keys), *(f"{metrics[m]:.4f}" for m in metric_names))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


if __name__ == "__main__":
    sys.exit(main())

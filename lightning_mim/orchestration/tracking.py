"""MLflow plumbing that Lightning's MLFlowLogger leaves to us (see docs/DEPENDENCIES.md "MLflow 3.x").

- MLflow 3 refuses the `./mlruns` file store: the tracking URI (SQLite) and artifact location are
  always explicit and absolute.
- Concurrent processes creating one SQLite DB / experiment race: `ensure_experiment` is called once by
  the driver before trials start, and again (idempotently) by each run.
- The 3.17 UI opens experiments in its GenAI view; `runs_table_url` gives the link to the runs table.
- Links point at the UI of the tracking URI in use (`ui_base`): a tracking server's own address, or the
  local `mlflow ui` that `ui_command` starts for a store; passwords are redacted (`redacted`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_mim.orchestration.config import BOOKKEEPING_KEYS, flatten

EXPERIMENT_KIND_TAG = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri_for(home: str | Path) -> str:
    return f"sqlite:///{Path(home).resolve()}/mlflow.db"


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str) -> str:
    """Create (or find) the experiment; returns its id. Safe to call from several processes."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            Path(artifact_location).mkdir(parents=True, exist_ok=True)
            experiment_id = client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND_TAG)
        except MlflowException:  # another process created it between our look-up and create
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND_TAG["mlflow.experimentKind"]:
            for key, value in EXPERIMENT_KIND_TAG.items():
                client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def environment_tags() -> dict[str, str]:
    """What a run's numbers depend on besides its config, as MLflow tags `env.*`: the library versions,
    torch's intra-op threads, the device and the host's processor. Two runs of one config agree to the
    last digit only when these agree (and even then not across machines; see docs/SWEEPS.md "Reproducibility")."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    tags = {
        "env.python": platform.python_version(),
        "env.torch_threads": str(torch.get_num_threads()),
        "env.device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        # the instruction set torch's CPU kernels were chosen for (what changes reductions' rounding)
        "env.cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
        "env.cuda": str(torch.version.cuda),
    }
    for package in ("torch", "torchvision", "lightning", "numpy", "torchmetrics", "torch-fidelity", "mlflow", "optuna"):
        try:
            tags[f"env.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"env.{package}"] = "absent"
    return tags


def mlflow_logger(cfg: DictConfig, parent_run_id: str | None = None, extra_tags: dict[str, Any] | None = None):
    """Lightning MLFlowLogger for `cfg.logger`, with the experiment created first and run nesting."""
    from lightning.pytorch.loggers import MLFlowLogger

    spec = OmegaConf.to_container(cfg.logger, resolve=True)
    spec.pop("_target_")
    Path(spec["artifact_location"]).mkdir(parents=True, exist_ok=True)
    ensure_experiment(spec["tracking_uri"], spec["experiment_name"], spec["artifact_location"])
    tags = dict(spec.pop("tags", None) or {})
    tags.update(environment_tags())
    tags.update(extra_tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return MLFlowLogger(tags=tags or None, **spec)


_ALIAS = re.compile(r"^\$\{\.*[A-Za-z_][\w.]*\}$")  # `${seed}`, `${transformer}`, `${.resolution}`: a plain reference


ALIASES_KEY = "aliases"  # a run's saved (resolved) config.yaml lists its alias keys under this key


def alias_keys(cfg: DictConfig) -> set[str]:
    """Dotted keys of `cfg` whose value is a plain reference to another key (`data.seed: ${seed}`,
    `model.transformer: ${transformer}`): the same value is a param under its own key already."""
    found: set[str] = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            name = f"{prefix}{key}"
            if OmegaConf.is_interpolation(node, key):
                if _ALIAS.match(str(node._get_node(key)._value())):
                    found.add(name)
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, name + ".")

    walk(cfg, "")
    return found


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("/") or value.startswith("~"))


def run_params_and_path_tags(cfg: DictConfig, aliases: set[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(params, tags) of a run. Params: every resolved key of `cfg` that says what the run computes,
    flat (`schedule.name`, `decode.steps`, `choices.ratio`), without the bookkeeping keys and without
    aliases (`alias_keys`), so in MLflow's compare view the params that differ between a sweep's
    children are its axes: a group whose options carry their own name (`schedule/cosine.yaml`: `name:
    cosine`) is that `<group>.name` only, not also `choices.<group>`. Tags `path.<key>`: file-system locations (output, cache, checkpoint
    files), which differ from run to run without changing what is computed. `aliases`: for a config
    that was saved resolved, the alias keys of its composition (`alias_keys(compose(cfg.overrides))`)."""
    aliases = alias_keys(cfg) if aliases is None else aliases  # a resolved config (config.yaml) has none left
    params, tags = {}, {}
    for key, value in flatten(cfg).items():
        if key.startswith(BOOKKEEPING_KEYS) or any(key == a or key.startswith(a + ".") for a in aliases):
            continue
        if _is_path(value):
            tags[f"path.{key}"] = str(value)
        else:
            params[key] = value
    for group in [k.removeprefix("choices.") for k in params if k.startswith("choices.")]:
        if f"{group}.name" in params:  # `schedule=linear` and `schedule.name=linear` alike: one param, `schedule.name`
            del params[f"choices.{group}"]
    return params, tags


def run_params(cfg: DictConfig, aliases: set[str] | None = None) -> dict[str, Any]:
    """The MLflow params of a training run and of an evaluation run alike (see `run_params_and_path_tags`)."""
    return run_params_and_path_tags(cfg, aliases)[0]


def log_run_config(logger, params_and_tags: tuple[dict[str, Any], dict[str, str]], config_file: Path) -> None:
    """The run's params and path tags (`run_params_and_path_tags`, taken before the run instantiates
    anything: Hydra's `instantiate` resolves interpolations in place inside interpolated sections) on
    a Lightning logger, and its config YAML as an artifact."""
    params, tags = params_and_tags
    logger.log_hyperparams(params)
    if hasattr(logger, "experiment") and hasattr(logger, "run_id"):
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        logger.experiment.log_text(logger.run_id, redacted(config_file.read_text()), config_file.name)  # no password logged


def reserve_first_metric(logger, key: str) -> None:
    """Make `key` the first metric of the logger's MLflow run, before training logs any other.

    MLflow's compare view opens its parallel-coordinates plot on the first metric the compared runs
    share, in the order the store returns a run's metrics (`sharedMetricKeys.slice(0, 1)` in its
    `ParallelCoordinatesPlotPanel`); the SQL stores return them in the order each key was first
    logged. So a sweep trial logs its objective here as NaN at step 0 ("not measured yet"); the
    driver logs the real value when the trial ends, which becomes the run's latest value (same
    step, later timestamp). A killed trial keeps the NaN: it has no objective. (SQLite, the default
    store, keeps that order; PostgreSQL returns rows in heap order, which updates can change.)
    """
    if not key:
        raise ValueError("reserve_first_metric needs a metric name, got an empty string")
    if hasattr(logger, "experiment") and getattr(logger, "run_id", None):
        logger.experiment.log_metric(logger.run_id, key, float("nan"), step=0)


LOCAL_HOST, LOCAL_PORT = "127.0.0.1", 5000  # where `mlflow ui` serves a database store by default


PASSWORD_IN_URI = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@")  # scheme://user:PASSWORD@


def redacted(text: str) -> str:
    """`text` (a URI, or text holding URIs: a config file, a command line) with the password of every
    URI's user info shown as `***` (`postgresql://me:***@db/mlflow`), for what is printed or logged."""
    return PASSWORD_IN_URI.sub(r"\1***@", text)


def is_server(tracking_uri: str) -> bool:
    """Whether `tracking_uri` is an MLflow tracking server (http or https), not a store opened directly."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_base(tracking_uri: str) -> str:
    """The address of the UI that shows the runs of `tracking_uri`, as it is printed (password
    redacted): the server itself, or the local `mlflow ui` that `ui_command` starts for a database or
    file store."""
    return redacted(tracking_uri.rstrip("/")) if is_server(tracking_uri) else f"http://{LOCAL_HOST}:{LOCAL_PORT}"


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a store's runs at `ui_base` (password redacted); None for a tracking
    server, which is its own UI."""
    if is_server(tracking_uri):
        return None
    return f"mlflow ui --backend-store-uri {redacted(tracking_uri)} --host {LOCAL_HOST} --port {LOCAL_PORT}"


def runs_table_url(tracking_uri: str, experiment_id: str) -> str:
    """The URL that opens the classic runs table (not the GenAI view) of MLflow 3.17's UI, on the UI of
    `tracking_uri` (`ui_base`)."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}?workflowType=machine_learning"


def compare_runs_url(tracking_uri: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow's compare view of `run_ids` (parallel coordinates of their params and metrics) on the UI of
    `tracking_uri`. The route is the UI's own `getCompareRunPageRoute`:
    `#/compare-runs?runs=<JSON list>&experiments=<JSON list>`."""
    from urllib.parse import quote

    runs, experiments = quote(json.dumps(list(run_ids))), quote(json.dumps(list(experiment_ids)))
    return f"{ui_base(tracking_uri)}/#/compare-runs?runs={runs}&experiments={experiments}"

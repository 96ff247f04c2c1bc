"""A sweep in MLflow: one parent run per study, one child run per trial (created by the trial's own
process, nested through `protocol.TrialContext`), and what the driver adds to them.

- The parent run is created once per study (its id is kept in the study's user attributes, so a
  resumed sweep keeps one parent) and finished with the per-point aggregates (`summary.log_to_parent`),
  the best trial and the compare link of the finished children.
- A trial's run gets the objective again as `objective/<name>` (one name to pick in the runs table).
- Runs of trials whose driver died are ended KILLED with the reason; a trial that failed gets a FAILED
  run with its error, whatever state it died in.

Every method is a no-op without a tracking URI (`logger=csv`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager

import optuna
from optuna.trial import TrialState

from lightning_mim.orchestration.protocol import objective_metric
from lightning_mim.orchestration.summary import (
    PARENT_ATTR,
    TRACKING_ATTR,
    ProtocolMismatch,
    all_rounds,
    latest_round,
    log_to_parent,
    outcomes_from_optuna,
    round_line,
    summarize,
)
from lightning_mim.orchestration.sweep_spec import SweepSpec
from lightning_mim.orchestration.sweep_study import DRIVER_DIED
from lightning_mim.orchestration.tracking import compare_runs_url, ensure_experiment, redacted

COMPARE_TAG = "lightning_mim.compare_url"  # on the parent run: MLflow's compare view of the finished children
ROUNDS_ARTIFACT = "rounds.json"  # on an adaptive sweep's parent run: every round's decisions
REPEAT_TAG = "lightning_mim.repeat"  # on the run of one seed of a `sweep.repeats` trial: that seed


class SweepRuns:
    """The MLflow runs of study `study_name` in experiment `experiment_name` at `tracking_uri` (None: no
    MLflow). `ensure()` creates the experiment; call it once, in the driver, before trials start."""

    def __init__(self, tracking_uri: str | None, experiment_name: str, artifact_location: str | None, study_name: str) -> None:
        self.tracking_uri, self.study_name = tracking_uri, study_name
        self.experiment_name, self.artifact_location = experiment_name, artifact_location
        self.experiment_id: str | None = None

    def ensure(self) -> None:
        if self.tracking_uri:
            self.experiment_id = ensure_experiment(self.tracking_uri, self.experiment_name, self.artifact_location)

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def parent(self, study: optuna.Study, lock: Callable[[], ContextManager[Any]], storage_url: str, spec_file: Path) -> str | None:
        """The sweep's parent run id, created (under `lock`) by the first worker that asks."""
        if not self.tracking_uri:
            return None
        with lock():
            study_attrs = study.user_attrs  # refreshed from storage
            if PARENT_ATTR in study_attrs:
                return study_attrs[PARENT_ATTR]
            client = self._client()
            run = client.create_run(
                self.experiment_id,
                run_name=f"sweep-{self.study_name}",
                tags={"lightning_mim.role": "sweep", "lightning_mim.study": self.study_name, "optuna.storage": redacted(storage_url)},
            )
            client.log_text(run.info.run_id, redacted(spec_file.read_text()), spec_file.name)  # no password logged
            study.set_user_attr(TRACKING_ATTR, self.tracking_uri)  # the study's own store: as private as the URI
            study.set_user_attr(PARENT_ATTR, run.info.run_id)
            return run.info.run_id

    def trial_runs(self, client, number: int | str, condition: str = "") -> list:
        """The MLflow runs of this sweep's trial `number` (newest first), optionally further filtered."""
        query = f"tags.`lightning_mim.study` = '{self.study_name}' and tags.`optuna.trial_number` = '{number}' {condition}"
        return client.search_runs([self.experiment_id], filter_string=query.strip(), order_by=["attributes.start_time DESC"])

    def end_dead_runs(self, numbers: list[int]) -> None:
        """End the runs of trials whose driver died: KILLED, with the reason as the `error` tag. That is
        a RUNNING run (it would stay RUNNING for good) and a FINISHED one (its process ended before the
        driver died, but Optuna never heard of its result). The redone trial gets a run of its own, so
        every point keeps one FINISHED run."""
        if not numbers or not self.tracking_uri:
            return
        client = self._client()
        for number in numbers:
            for run in self.trial_runs(client, number, "and attributes.status != 'FAILED' and attributes.status != 'KILLED'"):
                client.set_tag(run.info.run_id, "error", f"{DRIVER_DIED}: the trial is redone by the next run of the sweep")
                client.set_terminated(run.info.run_id, status="KILLED")

    def log_objective(self, number: int, objective: str, value: float, repeat: str | None = None) -> None:
        """The objective again as `objective/<name>` on trial `number`'s newest run (a redone trial's,
        not the dead one's; with `repeat`, its run of that seed): one name to pick in MLflow's runs table
        whatever the sweep optimises, and the metric MLflow's compare view starts on
        (`tracking.reserve_first_metric`)."""
        if not self.tracking_uri:
            return
        client = self._client()
        condition = "" if repeat is None else f"and tags.`{REPEAT_TAG}` = '{repeat}'"
        for run in self.trial_runs(client, number, condition)[:1]:
            client.log_metric(run.info.run_id, objective_metric(objective), float(value))

    def record_failed_run(self, number: int, run_name: str, parent_run_id: str | None, tags: dict[str, str],
                          params: dict[str, Any], error: str) -> None:
        """Make sure MLflow shows failed trial `number` as FAILED with its error, whatever state it died in."""
        if not self.tracking_uri:
            return
        client = self._client()
        runs = self.trial_runs(client, number)
        if runs:
            run_id = runs[0].info.run_id
        else:
            all_tags = {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run_id = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            for key, value in params.items():
                client.log_param(run_id, key, value)
        client.set_tag(run_id, "error", error[-4000:])
        client.set_terminated(run_id, status="FAILED")

    def finish_parent(self, study: optuna.Study, parent: str, spec: SweepSpec) -> None:
        """The parent run's aggregates over every trial of the study (the console table's numbers), the
        best trial, the compare link of the finished children; then FINISHED."""
        client = self._client()
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        client.log_metric(parent, "trials_complete", len(complete))
        client.log_metric(parent, "trials_failed", sum(t.state == TrialState.FAIL for t in trials))
        if complete:
            best = study.best_trial
            client.log_metric(parent, f"best_{spec.objective.replace('/', '_')}", best.value)
            client.set_tag(parent, "best_trial", str(best.number))
            for key, value in best.params.items():
                client.set_tag(parent, f"best.{key}", str(value))
            try:
                summary = summarize(outcomes_from_optuna(trials), spec.objective, spec.direction,
                                    options=spec.verdict_options(), rounds=latest_round(study.user_attrs),
                                    secondary=spec.secondary)
            except ProtocolMismatch as err:
                client.set_tag(parent, "lightning_mim.no_table", str(err))
            else:
                log_to_parent(client, parent, summary)
                rounds = all_rounds(study.user_attrs)
                if rounds:  # an adaptive sweep: what each round decided
                    client.log_dict(parent, {"rounds": [r.to_dict() for r in rounds], "lines": [round_line(r) for r in rounds]},
                                    ROUNDS_ARTIFACT)
                    client.log_metric(parent, "rounds", len(rounds))
                client.set_tag(parent, "best_point", summary.points[0].label())
            client.set_tag(parent, "seeds_per_point", str(spec.seeds))
        children = self.finished_child_runs(client)
        if children:
            client.set_tag(parent, COMPARE_TAG, compare_runs_url(self.tracking_uri, children, [self.experiment_id]))
        client.set_terminated(parent, status="FINISHED")

    def log_confirmation(self, parent: str, record: dict[str, Any]) -> None:
        """A `sweep.repeats` search's chosen configuration on fresh seeds (`sweep.Confirmation.record`):
        `confirmation.json` and, when an estimate exists, `confirmed/<objective>` with its interval."""
        if not self.tracking_uri:
            return
        client = self._client()
        client.log_dict(parent, record, "confirmation.json")
        client.set_tag(parent, "confirmation_study", record["study"])
        estimate = record["estimate"]
        if estimate is not None:
            name = f"confirmed/{record['objective']}"
            for suffix, value in (("", estimate["mean"]), ("_ci_low", estimate["low"]), ("_ci_high", estimate["high"])):
                if value is not None:
                    client.log_metric(parent, name + suffix, float(value))

    def finished_child_runs(self, client=None) -> list[str]:
        """Ids of this sweep's FINISHED child runs (one per completed trial; trained or evaluated), in
        trial order: what the compare link opens."""
        if not self.tracking_uri:
            return []
        client = client or self._client()
        query = (f"tags.`lightning_mim.study` = '{self.study_name}' and tags.`lightning_mim.role` = 'trial' "
                 "and attributes.status = 'FINISHED'")
        runs = client.search_runs([self.experiment_id], filter_string=query, max_results=5000)
        runs.sort(key=lambda r: int(r.data.tags.get("optuna.trial_number", 0)))
        return [r.info.run_id for r in runs]

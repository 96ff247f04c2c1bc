"""`kill_sweep_at`: a sweep phase hook that kills the whole sweep at one exact phase of a trial.

    LIGHTNING_MIM_PHASE_HOOK=_sweep_kill:kill_sweep_at LIGHTNING_MIM_TEST_KILL_AT='{"phase": "done"}' \
        PYTHONPATH=tests python -m lightning_mim.sweep ...   # started in a session of its own

Imports nothing heavy: the sweep driver imports it too.
"""

from __future__ import annotations

import json
import os
import signal


KILL_AT_ENV = "LIGHTNING_MIM_TEST_KILL_AT"  # JSON {"phase": ..., "min_step": N (optional)}


def kill_sweep_at(phase: str, **info) -> None:
    """A sweep phase hook (`protocol.PHASE_HOOK_ENV=_sweep_kill:kill_sweep_at`): at the first call with the
    phase named in `KILL_AT_ENV` (and, if given, a training step >= `min_step`), SIGKILL this process's
    whole process group — the sweep driver, its helper workers and every trial process — as a lost node
    or an OOM killer would. Whoever calls it (the driver, or a trial's process) dies with the rest."""
    wanted = json.loads(os.environ.get(KILL_AT_ENV) or "{}")
    if phase != wanted.get("phase"):
        return
    if "min_step" in wanted and int(info.get("step") or 0) < int(wanted["min_step"]):
        return
    os.killpg(os.getpgid(0), signal.SIGKILL)

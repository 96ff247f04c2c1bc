"""The conditions line every benchmark prints before its table (`benchmarks/conditions.py`)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _conditions():
    spec = importlib.util.spec_from_file_location("conditions", BENCHMARKS / "conditions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_line_names_the_machine_its_matmul_rate_and_the_commit():
    conditions = _conditions()
    line = conditions.conditions(rate=97.9e9)
    assert line.startswith(f"machine: {conditions.cpu_model()}, {os.cpu_count()} cores, GPU ")
    assert "matmul 97.9 GFLOP/s on one thread" in line and "load average" in line
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS, capture_output=True, text=True).stdout.strip()
    assert re.search(rf"commit {head}(-dirty)?;", line), line
    assert conditions.cpu_model()  # never empty


def test_every_benchmark_prints_the_conditions():
    for script in sorted(BENCHMARKS.glob("*.py")):
        if script.name != "conditions.py":
            assert "print_conditions(" in script.read_text(), f"{script.name} does not print its conditions"

"""Orchestration: the layer above the library that turns configs into runs.

Entry points (`train`, `sweep`, `evaluate`, `tokenize`, `prepare`), config composition (`config`,
`overrides`), the stage cache (`stages`), the sweep driver <-> trial process contract (`protocol`),
MLflow plumbing (`tracking`) and Optuna plumbing (`pruning`, `pruning_callback`). Nothing in the
library (`lightning_mim.nn`, `modules`, `data`, `eval`, `callbacks`, `checkpoints`, the math modules)
imports from here; see docs/ARCHITECTURE.md.
"""

"""A trial's evaluation protocol: what its objective was measured under, as a fingerprint.

Two trials' numbers may be pooled (the seeds of one point) or compared (two points) only when they
were measured the same way. `evaluation_protocol(cfg)` reads that from the trial's config:

  samples      `evaluation.num_samples`, and the real images the statistics use (`num_real`)
  extractors   `evaluation.extractor`, with the identity of each one's weights:
               domain     the recipe that trains the classifier (its options over the dataset below):
                          each home trains its own, so the recipe, not a hash of its tensors, is what
                          lets nodes with separate homes pool their trials
               inception  the weights file's name and size (torch-fidelity's release file)
  reference    the images the real statistics come from: the data section without how it is batched,
               loaded and seeded (`stages.DATA_LOADING_KEYS`), the split (`evaluation.split`) and the
               image size
  metric knobs the generation callback's settings that change a number (KID subsets, IS splits, the
               precision/recall neighbourhood)

What the ablation varies (the model, the decode settings, the seed and the evaluation draws that
follow it) is not part of it. `protocol_difference(a, b)` names the first setting two fingerprints
disagree on, for a one-line refusal (`orchestration.summary.summarize`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from lightning_mim.orchestration.stages import DATA_LOADING_KEYS

PROTOCOL_ATTR = "evaluation_protocol"  # the Optuna trial's user attribute that records it
METRIC_KNOBS = ("num_real", "kid_subsets", "kid_subset_size", "prc_neighborhood", "is_splits", "domain_classifier")


def evaluation_protocol(cfg: DictConfig) -> dict[str, Any]:
    """The fingerprint of how `cfg`'s run measures its generation metrics (see the module docstring):
    a flat {dotted key: value} dict with plain JSON values."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    evaluation = plain.get("evaluation") or {}
    data = plain.get("data") or {}
    metrics = ((plain.get("callbacks") or {}).get("generation_metrics") or {})
    out: dict[str, Any] = {
        "evaluation.num_samples": evaluation.get("num_samples"),
        "evaluation.extractor": list(evaluation.get("extractor") or []),
        "evaluation.split": evaluation.get("split"),
        "data.image_size": data.get("image_size"),
    }
    for key, value in sorted(data.items()):
        if key not in DATA_LOADING_KEYS and key not in ("image_size", "_target_") and not isinstance(value, dict):
            out[f"data.{key}"] = value
    out["data._target_"] = data.get("_target_")
    for key in METRIC_KNOBS:
        if key in metrics:
            out[f"callbacks.generation_metrics.{key}"] = metrics[key]
    if "inception" in out["evaluation.extractor"]:
        weights = evaluation.get("inception_weights")
        path = Path(str(weights)).expanduser() if weights else None
        out["evaluation.inception_weights"] = (
            f"{path.name} ({path.stat().st_size} bytes)" if path is not None and path.is_file() else weights
        )
    return out


def protocol_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """`evaluation.num_samples: 500 vs 1000` for the first key (sorted) on which `a` and `b` differ;
    None when they are the same protocol."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key, '(absent)')} vs {b.get(key, '(absent)')}"
    return None

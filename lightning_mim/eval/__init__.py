"""Evaluation: generation metrics (FID / IS / KID / precision-recall / CAS), domain classifier, probes.

Pure functions and plain modules; the Lightning callbacks in `lightning_mim.callbacks` call them.
"""

from lightning_mim.eval.extractors import EXTRACTORS, FeatureExtractor, build_extractor
from lightning_mim.eval.generation import (
    RealStatistics,
    compute_generation_metrics,
    evaluate_generation,
    frechet_distance,
)
from lightning_mim.eval.images import to_uint8
from lightning_mim.eval.probe import fewshot_top1, knn_top1, train_linear_probe

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "RealStatistics",
    "build_extractor",
    "compute_generation_metrics",
    "evaluate_generation",
    "fewshot_top1",
    "frechet_distance",
    "knn_top1",
    "to_uint8",
    "train_linear_probe",
]

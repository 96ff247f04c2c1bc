"""Lightning callbacks: generation metrics, linear probe, pictures (all hold their own state, not the
module's), per-rank seeding, exact resume and the corrupt-sample counts of the data pipeline."""

from lightning_mim.callbacks.corrupt_samples import CorruptSampleLogger
from lightning_mim.callbacks.exact_resume import ExactResume
from lightning_mim.callbacks.generation_metrics import GenerationMetrics
from lightning_mim.callbacks.linear_probe import LinearProbe
from lightning_mim.callbacks.per_rank_seed import PerRankSeed
from lightning_mim.callbacks.pictures import Pictures
from lightning_mim.callbacks.progress_bar import StepBudgetProgressBar

__all__ = ["CorruptSampleLogger", "ExactResume", "GenerationMetrics", "LinearProbe", "PerRankSeed", "Pictures", "StepBudgetProgressBar"]

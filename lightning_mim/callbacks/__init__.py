"""Lightning callbacks: generation metrics, linear probe, pictures (all hold their own state, not the module's)."""

from lightning_mim.callbacks.generation_metrics import GenerationMetrics
from lightning_mim.callbacks.linear_probe import LinearProbe
from lightning_mim.callbacks.pictures import Pictures

__all__ = ["GenerationMetrics", "LinearProbe", "Pictures"]

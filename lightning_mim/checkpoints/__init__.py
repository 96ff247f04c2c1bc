"""Loading official MaskGIT / MAGE checkpoints and our own into lightning-mim modules.

`vqgan.py` handles tokenizers, `mage.py` MAGE stage-2 checkpoints; this file re-exports the loaders:
`load_tokenizer`, `load_vqgan` (a VQGAN from our tokenizer checkpoint or the official f16 weights) and
`load_mage` (an `nn.mage.MAGE` from an official or our own MAGE checkpoint).
"""

from lightning_mim.checkpoints.mage import load_mage
from lightning_mim.checkpoints.vqgan import CheckpointMismatchError, load_tokenizer, load_vqgan

__all__ = ["CheckpointMismatchError", "load_mage", "load_tokenizer", "load_vqgan"]

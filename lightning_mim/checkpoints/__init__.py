"""Loading official MaskGIT / MAGE checkpoints and our own into lightning-mim modules.

`vqgan.py` handles tokenizers, `mage.py` MAGE stage-2 checkpoints; this file only re-exports.
"""

"""lightning-mim: ablations of masked generative image models (MaskGIT, MAGE/MAGE-C)."""

__version__ = "0.1.0"

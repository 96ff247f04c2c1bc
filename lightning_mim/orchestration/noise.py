"""Known, harmless library messages kept out of run and trial logs (each with the reason it is harmless).

`filter_known_noise()` is called by the entry points that train or evaluate, before Lightning starts;
anything not listed here still reaches the log. Filters match the message text, so a library that
rewords a message makes it visible again rather than hiding something new.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is harmless here)
KNOWN_WARNINGS = (
    # Lightning 2.6 calls torch.utils._pytree's deprecated LeafSpec check internally; nothing of ours.
    (r".*isinstance\(treespec, LeafSpec\)", "Lightning-internal deprecation"),
    # Stage-2 modules hold a frozen tokenizer (and eval-only feature heads) in eval mode on purpose.
    (r"Found \d+ module\(s\) in eval mode at the start of training", "the frozen tokenizer is in eval mode by design"),
    # The tokenizer's GAN uses manual optimization: last.ckpt holds the state after the step, which is
    # exactly what resuming needs.
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", "post-step state is what resume needs"),
)
KNOWN_LOG_LINES = (
    # An advertisement for a hosted logger, printed by every Trainer.
    "try installing [litlogger]",
)


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in KNOWN_LOG_LINES)


def filter_known_noise() -> None:
    """Install the filters above (idempotent)."""
    for pattern, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLines) for f in logger.filters):
            logger.addFilter(_DropKnownLines())

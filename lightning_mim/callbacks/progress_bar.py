"""`StepBudgetProgressBar`: Lightning's rich progress bar, with an epoch label that makes sense for
step-budgeted runs.

Lightning labels the training bar `Epoch {e}/{max_epochs - 1}`; our runs are budgeted in optimizer
steps (`trainer.max_steps`, `max_epochs=-1`), which it prints as `Epoch 11/-2`. This bar says
`Epoch 11 · step 450/600` instead (and keeps `Epoch e/E` when an epoch budget is set).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def train_description(current_epoch: int, max_epochs: int | None, step: int, max_steps: int | None) -> str:
    """The training bar's label (pure, for tests)."""
    text = f"Epoch {current_epoch}"
    if max_epochs is not None and max_epochs > 0:
        text += f"/{max_epochs - 1}"
    if max_steps is not None and max_steps > 0:
        text += f" · step {step}/{max_steps}"
    return text


class StepBudgetProgressBar(RichProgressBar):
    # Overrides RichProgressBar's label method (Lightning 2.6; private, so re-check on upgrades).
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        text = train_description(current_epoch, trainer.max_epochs, trainer.global_step, trainer.max_steps)
        if len(self.validation_description) > len(text):  # Lightning pads to avoid flicker
            text = f"{text:{len(self.validation_description)}}"
        return text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:  # the step moves within an epoch
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))

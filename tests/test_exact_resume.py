"""Building blocks of exact resume: the training loader continues an epoch from a batch as the
uninterrupted pass would. (A killed-and-resumed run does not yet end with the uninterrupted run's
weights: see issue 16's notes.)"""

from __future__ import annotations

import pytest
import torch

from lightning_mim.data.pipeline import FixedBatches


def test_fixed_batches_resume_replays_the_epoch_from_the_batch():
    """The loader alone: epoch e from batch b equals the uninterrupted pass's batches b.. of epoch e."""

    class Stream:
        """An endless stream whose content depends on the epoch counter, like the seeded shard pipeline."""

        def __init__(self, epoch):
            self.epoch = epoch
            self.generator = torch.Generator().manual_seed(3)

        def __iter__(self):
            base = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator)) % 1000
            return iter([(self.epoch.value, base, i) for i in range(100)])

    from lightning_mim.data.pipeline import _Epoch

    def loader():
        epoch = _Epoch()
        return FixedBatches(Stream(epoch), 4, epoch)

    full = loader()
    passes = [list(full) for _ in range(3)]
    resumed = loader()
    resumed.resume(epoch=1, batches_done=3)
    assert list(resumed) == passes[1][3:]
    assert list(resumed) == passes[2]
    with pytest.raises(ValueError, match="cannot resume"):
        resumed.resume(epoch=0, batches_done=5)

"""Seed i of every grid point shares what the design says it shares — the model's initial weights,
the data order and the evaluation's draws — so a sweep's points are blocked by seed and the summary
compares them by seed (`orchestration.summary`). Checked on the real build path of a training run."""

from __future__ import annotations

import torch

from lightning_mim.orchestration.config import compose
from lightning_mim.orchestration.training import seeded_data_and_model


def build(overrides: list[str], home) -> tuple:
    cfg = compose([*overrides, f"paths.home={home}"])
    datamodule, model = seeded_data_and_model(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    first = next(iter(datamodule.train_dataloader()))
    return cfg, model, first


def test_seed_i_of_two_schedules_shares_init_data_order_and_evaluation_draws(tiny_stage2_overrides, session_home):
    runs = {
        (schedule, seed): build([*tiny_stage2_overrides, f"schedule={schedule}", f"seed={seed}"], session_home)
        for schedule in ("cosine", "linear")
        for seed in (0, 1)
    }
    for seed in (0, 1):
        (cfg_a, model_a, batch_a), (cfg_b, model_b, batch_b) = runs[("cosine", seed)], runs[("linear", seed)]
        assert cfg_a.model.ratio.schedule != cfg_b.model.ratio.schedule  # the points differ...
        weights_a, weights_b = model_a.transformer.state_dict(), model_b.transformer.state_dict()
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # ... not in their initial weights
        assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))  # nor in the order their data comes in
        assert cfg_a.evaluation.seed == cfg_b.evaluation.seed == seed  # nor in the evaluation's draws
    # and another seed is another block
    other = runs[("cosine", 1)][1].transformer.state_dict()
    assert not all(torch.equal(other[k], v) for k, v in runs[("cosine", 0)][1].transformer.state_dict().items())
    assert not torch.equal(runs[("cosine", 0)][2][0], runs[("cosine", 1)][2][0])

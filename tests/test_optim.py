"""The papers' optimiser recipes: decoupled weight decay (flax.optim.Adam / torch AdamW), lr schedules."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mim.optim import build_optimizer, lr_lambda


def flax_adam_step(param, grad, *, lr, b1, b2, eps, wd):
    """First step of flax.optim.Adam (the official MaskGIT optimiser): Adam update, then
    param -= lr·wd·param with the pre-step param (decoupled decay)."""
    m = (1 - b1) * grad / (1 - b1)
    v = (1 - b2) * grad**2 / (1 - b2)
    return param - lr * m / (v.sqrt() + eps) - lr * wd * param


def test_default_decay_is_decoupled_like_flax_adam():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    optimizer = build_optimizer(layer, lr=0.1, betas=(0.9, 0.96), weight_decay=0.045)["optimizer"]
    layer.weight.grad = torch.randn(2, 3)
    layer.bias.grad = torch.zeros(2)
    expected = flax_adam_step(before, layer.weight.grad, lr=0.1, b1=0.9, b2=0.96, eps=1e-8, wd=0.045)
    optimizer.step()
    assert torch.allclose(layer.weight, expected, atol=1e-6)


def test_coupled_l2_adam_warns():
    with pytest.warns(UserWarning, match="use name 'adamw'"):
        build_optimizer(torch.nn.Linear(2, 2), name="adam", weight_decay=0.045)


def test_unknown_optimizer_lists_valid():
    with pytest.raises(ValueError, match="optim.name=sgd: must be one of adam, adamw"):
        build_optimizer(torch.nn.Linear(2, 2), name="sgd")


def test_lr_schedule_warmup_constant_and_cosine():
    constant = lr_lambda(4, 100, "constant")
    assert [constant(s) for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]
    cosine = lr_lambda(0, 10, "cosine")
    assert cosine(0) == 1.0 and cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert cosine(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))

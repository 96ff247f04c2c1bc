"""The vector quantiser pinned to docs/FIDELITY.md "MaskGIT tokenizer": squared-L2 lookup, beta = 0.25, straight-through; EMA, restart."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mim.nn.quantizer import (
    VectorQuantizer,
    codebook_usage,
    entropy_loss,
    perplexity_from_counts,
    squared_distances,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _set_codes(q: VectorQuantizer, codes: list[list[float]]) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes))
        if q.ema:
            q.embed_avg.copy_(q.embedding.weight)


def _z(vectors: list[list[float]]) -> torch.Tensor:
    """(N, D) vectors -> (1, D, 1, N) latents, so indices come back as (1, 1, N)."""
    return torch.tensor(vectors, dtype=torch.float32).t()[None, :, None, :].contiguous()


def test_squared_distances_match_definition():
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    expected = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(squared_distances(a, b), expected, rtol=1e-5, atol=1e-5)


def test_nearest_code_by_squared_l2():
    q = VectorQuantizer(3, 2)
    _set_codes(q, [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    q.eval()
    out = q(_z([[0.1, 0.1], [0.9, -0.2], [0.2, 1.5], [0.6, 0.0], [-3.0, 0.0]]))
    assert out.indices.shape == (1, 1, 5) and out.indices.dtype == torch.int64
    assert out.indices.flatten().tolist() == [0, 1, 2, 1, 0]
    torch.testing.assert_close(out.z_q[0, :, 0, 2], torch.tensor([0.0, 2.0]))
    assert out.distances.shape == (1, 1, 5, 3)
    assert out.counts.tolist() == [2.0, 2.0, 1.0]


def test_loss_is_codebook_plus_beta_commitment_with_split_gradients():
    q = VectorQuantizer(2, 1, beta=0.25)
    _set_codes(q, [[0.0], [10.0]])
    z = _z([[1.0], [3.0]]).requires_grad_(True)
    out = q(z)
    # both terms equal mean((z - e)^2) = (1 + 9) / 2 = 5 in value: loss = (1 + 0.25) * 5
    assert out.loss.item() == pytest.approx(1.25 * 5.0)
    out.loss.backward()
    # d/de0 of mean((e0 - sg z)^2) over 2 vectors = (2 (0 - 1) + 2 (0 - 3)) / 2 = -4; code 1 unused
    torch.testing.assert_close(q.embedding.weight.grad, torch.tensor([[-4.0], [0.0]]))
    # d/dz of beta * mean((z - sg e)^2) = 0.25 * 2 (z - e) / 2
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([0.25 * 1.0, 0.25 * 3.0]))


def test_straight_through_gradient_is_identity():
    q = VectorQuantizer(8, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    weights = torch.randn_like(out.z_q)
    (out.z_q * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)
    # forward value is exactly the chosen codes
    codes = q.embedding.weight[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.z_q, codes)


def test_ema_update_two_code_toy_matches_hand_computation():
    q = VectorQuantizer(2, 1, beta=0.25, ema=True, decay=0.5, eps=0.1)
    _set_codes(q, [[0.0], [10.0]])
    assert not q.embedding.weight.requires_grad
    q.train()
    out = q(_z([[1.0], [3.0], [9.0]]))  # assignments 0, 0, 1 -> counts (2, 1), sums (4, 9)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    # cluster_size = 0.5*1 + 0.5*(2, 1) = (1.5, 1.0); embed_avg = 0.5*(0, 10) + 0.5*(4, 9) = (2, 9.5)
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.embed_avg, torch.tensor([[2.0], [9.5]]))
    # Laplace: n = 2.5; smoothed = (cs + 0.1) / (2.5 + 2*0.1) * 2.5 = (1.6, 1.1) * 2.5 / 2.7
    # codes = embed_avg / smoothed = (2 * 2.7 / 4.0, 9.5 * 2.7 / 2.75) = (1.35, 9.32727...)
    torch.testing.assert_close(q.embedding.weight, torch.tensor([[1.35], [25.65 / 2.75]]))
    # EMA: only the commitment term is a loss
    assert out.loss.item() == pytest.approx(0.25 * (1 + 9 + 1) / 3)


def test_ema_does_not_update_in_eval_or_without_grad():
    q = VectorQuantizer(2, 1, ema=True, decay=0.5)
    _set_codes(q, [[0.0], [10.0]])
    before = q.embedding.weight.clone()
    q.eval()
    q(_z([[1.0], [9.0]]))
    q.train()
    with torch.no_grad():
        q(_z([[1.0], [9.0]]))
    torch.testing.assert_close(q.embedding.weight, before)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, restart_after=2)
    _set_codes(q, [[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]])
    q.train()
    batch = torch.randn(1, 2, 4, 4) * 0.1  # every vector is nearest to code 0
    for _ in range(2):
        out = q(batch)
        assert out.indices.unique().tolist() == [0]
    assert q.steps_unused.tolist() == [0, 2, 2, 2]
    out = q(batch)  # codes 1..3 were unused for 2 steps: re-initialised from this batch, then used
    flat = batch.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (1, 2, 3):
        assert (q.embedding.weight[k] - flat).abs().sum(1).min().item() == 0.0  # a copy of an encoder output
    assert codebook_usage(out.counts).item() > 0.25
    assert q.steps_unused.tolist()[0] == 0


def test_restart_waits_for_the_threshold_and_not_in_eval():
    q = VectorQuantizer(2, 1, restart_after=3)
    _set_codes(q, [[0.0], [100.0]])
    q.train()
    for _ in range(3):
        q(_z([[0.5], [0.2]]))
    assert q.embedding.weight[1].item() == 100.0 and q.steps_unused.tolist() == [0, 3]
    q.eval()
    q(_z([[0.5], [0.2]]))
    assert q.embedding.weight[1].item() == 100.0
    q.train()
    q(_z([[0.5], [0.2]]))
    assert q.embedding.weight[1].item() in (0.5, 0.2)


def test_l2_normalised_lookup_uses_cosine_similarity():
    q = VectorQuantizer(3, 2, l2_normalize=True)
    _set_codes(q, [[10.0, 0.0], [0.0, 0.1], [-1.0, -1.0]])
    q.eval()
    out = q(_z([[0.2, 0.1], [0.1, 5.0], [-2.0, -1.5]]))
    assert out.indices.flatten().tolist() == [0, 1, 2]
    norms = out.z_q[0, :, 0, :].norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(3))


def test_buffers_exist_only_for_enabled_options():
    assert list(VectorQuantizer(4, 2).state_dict()) == ["embedding.weight"]
    assert set(VectorQuantizer(4, 2, ema=True).state_dict()) == {"embedding.weight", "cluster_size", "embed_avg"}
    assert set(VectorQuantizer(4, 2, restart_after=5).state_dict()) == {"embedding.weight", "steps_unused"}


def test_perplexity_and_usage():
    assert perplexity_from_counts(torch.tensor([3.0, 3.0, 3.0, 3.0])).item() == pytest.approx(4.0)
    assert perplexity_from_counts(torch.tensor([7.0, 0.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    assert perplexity_from_counts(torch.tensor([1.0, 3.0])).item() == pytest.approx(
        math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    )
    assert codebook_usage(torch.tensor([1.0, 0.0, 2.0, 0.0])).item() == 0.5


def test_entropy_loss_values():
    k = 4
    # confident and spread over all codes: sample entropy 0, average entropy log K -> -log K
    spread = torch.eye(k) * 100.0
    assert entropy_loss(spread, temperature=1.0).item() == pytest.approx(-math.log(k), abs=1e-3)
    # confident and collapsed on one code: 0 - 0
    collapsed = torch.zeros(8, k)
    collapsed[:, 2] = 100.0
    assert entropy_loss(collapsed, temperature=1.0).item() == pytest.approx(0.0, abs=1e-3)
    # hand computation for one uniform row: sample entropy log K, average entropy log K (with +1e-5)
    uniform = torch.zeros(1, k)
    expected = math.log(k) + k * 0.25 * math.log(0.25 + 1e-5)
    assert entropy_loss(uniform).item() == pytest.approx(expected, abs=1e-6)


def test_bad_inputs_raise():
    q = VectorQuantizer(4, 2)
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\)"):
        q(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        q.embed_indices(torch.tensor([[[0, 4]]]))
    with pytest.raises(ValueError, match="restart_after"):
        VectorQuantizer(4, 2, restart_after=0)

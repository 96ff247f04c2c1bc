"""lightning_mim.decoding pinned to docs/FIDELITY.md "MaskGIT iterative decoding" (parallel_decode.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_mim.decoding import decode, guidance_at, masked_counts

K, MASK = 16, 40  # codebook size, mask id (class slots in between)
T8 = [251, 236, 212, 181, 142, 97, 49, 1]
T12 = [253, 247, 236, 221, 203, 181, 155, 127, 97, 66, 33, 1]


def table_logits(n_tokens: int, k: int = K, seed: int = 0, scale: float = 3.0):
    """A fixed random (N, K) logit table, independent of the input: a tiny stand-in for a model."""
    table = scale * torch.randn(n_tokens, k, generator=torch.Generator().manual_seed(seed))
    calls = []

    def fn(tokens):
        calls.append(tokens.clone())
        return table.expand(tokens.shape[0], -1, -1)

    fn.calls = calls
    return fn


def peaked_logits(n_tokens: int):
    """Position n predicts code n % K with a margin growing with n: confidence order = position order."""
    table = torch.zeros(n_tokens, K)
    table[torch.arange(n_tokens), torch.arange(n_tokens) % K] = 1.0 + torch.arange(n_tokens) * 0.01
    return lambda tokens: table.expand(tokens.shape[0], -1, -1)


def n_masked(grid):
    return (grid == MASK).sum(1).tolist()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_masked_counts_match_paper_vectors():
    assert masked_counts(256, 8) == T8
    assert masked_counts(256, 12) == T12  # float32: 127, not 128
    assert masked_counts(256, 12, start_iter=2) == T12[2:]
    assert masked_counts(256, 1) == [1]
    assert masked_counts(1, 4) == [1, 1, 1, 1]
    # floor(5·γ) = 4 4 4 4 3 3 3 2 1 1 0 0: the clamp to N_unknown_now − 1 reveals ≥ 1 token per step
    assert masked_counts(5, 12) == [4, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert masked_counts(0, 3) == [0, 0, 0]


@pytest.mark.parametrize("steps,expected", [(8, T8), (12, T12)])
def test_decode_follows_the_schedule(steps, expected):
    tokens = torch.full((2, 256), MASK)
    out, history = decode(table_logits(256), tokens, mask_id=MASK, steps=steps, generator=gen(), return_steps=True)
    assert len(history) == steps
    assert [n_masked(h) for h in history] == [[c, c] for c in expected]
    assert out.shape == (2, 256) and out.dtype == tokens.dtype
    assert (out >= 0).all() and (out < K).all()
    # once revealed a token never changes; the masked set only shrinks; the output extends the last step
    for prev, nxt in zip(history, history[1:] + [out]):
        known = prev != MASK
        assert torch.equal(nxt[known], prev[known])
        assert not ((nxt == MASK) & ~(prev == MASK)).any()


def test_output_is_the_last_sampled_tokens_before_remasking():
    out, history = decode(table_logits(64), torch.full((3, 64), MASK), mask_id=MASK, steps=4, generator=gen(), return_steps=True)
    last = history[-1]
    assert n_masked(last) == [1, 1, 1] and n_masked(out) == [0, 0, 0]
    assert torch.equal(out[last != MASK], last[last != MASK])


def test_remasks_the_least_confident_without_noise():
    n = 32
    out, history = decode(peaked_logits(n), torch.full((1, n), MASK), mask_id=MASK, steps=4,
                           temperature=0, choice_temperature=0.0, generator=gen(), return_steps=True)
    assert torch.equal(out[0], torch.arange(n) % K)  # argmax everywhere
    for grid, count in zip(history, masked_counts(n, 4)):
        # lowest confidence = lowest positions (smallest margin) stay masked
        assert torch.equal((grid[0] == MASK).nonzero().flatten(), torch.arange(count))
    # no noise -> no randomness at all
    again = decode(peaked_logits(n), torch.full((1, n), MASK), mask_id=MASK, steps=4, temperature=0,
                   choice_temperature=0.0, generator=gen(99))
    assert torch.equal(out, again)


def test_gumbel_noise_randomises_the_choice_and_anneals_to_zero():
    n = 32

    def run(seed):
        _, history = decode(peaked_logits(n), torch.full((1, n), MASK), mask_id=MASK, steps=3, temperature=0,
                            choice_temperature=50.0, generator=gen(seed), return_steps=True)
        return history

    runs = [run(s) for s in range(6)]
    first = {tuple((h[0][0] == MASK).nonzero().flatten().tolist()) for h in runs}
    assert len(first) > 1  # step 0: large noise makes the re-masked set seed-dependent
    for h in runs:  # last step: noise scale 50·(1 − 1) = 0 -> the least confident unknown one stays masked
        unknown_before = (h[-2][0] == MASK).nonzero().flatten()
        assert (h[-1][0] == MASK).nonzero().flatten().tolist() == [unknown_before.min().item()]


def test_samples_follow_softmax_at_temperature():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    fn = lambda tokens: logits.expand(tokens.shape[0], tokens.shape[1], -1)  # noqa: E731
    for temp in (1.0, 2.0):
        out = decode(fn, torch.full((20000, 1), MASK), mask_id=MASK, steps=1, temperature=temp, generator=gen())
        freq = torch.bincount(out[:, 0], minlength=4).float() / 20000
        assert torch.allclose(freq, torch.softmax(logits / temp, 0), atol=0.012), (temp, freq)
    banned = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0])  # zero-probability codes are never drawn
    fn = lambda tokens: banned.expand(tokens.shape[0], tokens.shape[1], -1)  # noqa: E731
    out = decode(fn, torch.full((4000, 1), MASK), mask_id=MASK, steps=1, generator=gen())
    assert set(out.flatten().tolist()) == {1, 3} and abs((out == 1).float().mean().item() - 0.5) < 0.03


def test_never_samples_class_or_mask_ids_and_keeps_known_tokens():
    g = gen(1)
    tokens = torch.randint(0, K, (6, 50), generator=g)
    unknown = torch.rand(6, 50, generator=g) < 0.6
    tokens[unknown] = MASK
    fn = table_logits(50, scale=0.1)  # nearly flat: every code gets sampled
    out = decode(fn, tokens, mask_id=MASK, steps=5, generator=g)
    assert (out < K).all() and (out >= 0).all()
    assert torch.equal(out[~unknown], tokens[~unknown])
    assert out.unique().numel() == K


def test_per_sample_unknown_counts_and_all_known():
    tokens = torch.randint(0, K, (4, 256), generator=gen())
    tokens[0] = MASK
    tokens[1, :100] = MASK
    tokens[2, 7] = MASK
    tokens[3, 10:15] = MASK
    fn = table_logits(256)
    out, history = decode(fn, tokens, mask_id=MASK, steps=8, generator=gen(), return_steps=True)
    got = list(zip(*[n_masked(h) for h in history]))
    assert list(got[0]) == T8
    assert list(got[1]) == masked_counts(100, 8)
    assert list(got[2]) == [1] * 8
    assert list(got[3]) == [4, 3, 2, 1, 1, 1, 1, 1]
    tokens[3] = 0
    out, history = decode(fn, tokens, mask_id=MASK, steps=8, generator=gen(), return_steps=True)
    assert [n_masked(h)[3] for h in history] == [0] * 8
    assert torch.equal(out[3], tokens[3]) and (out != MASK).all()
    known = tokens != MASK
    assert torch.equal(out[known], tokens[known])


def test_all_known_input_is_returned_unchanged_without_model_calls():
    tokens = torch.randint(0, K, (2, 9), generator=gen())
    fn = table_logits(9)
    out, history = decode(fn, tokens, mask_id=MASK, steps=5, start_iter=1, return_steps=True)
    assert torch.equal(out, tokens) and out is not tokens
    assert len(history) == 4 and fn.calls == []


def test_one_step_and_one_token():
    out, history = decode(table_logits(256), torch.full((2, 256), MASK), mask_id=MASK, steps=1, generator=gen(), return_steps=True)
    assert n_masked(out) == [0, 0] and n_masked(history[0]) == [1, 1]
    for steps in (1, 4):
        out, history = decode(table_logits(1), torch.full((3, 1), MASK), mask_id=MASK, steps=steps, generator=gen(), return_steps=True)
        assert out.shape == (3, 1) and (out < K).all()
        assert [n_masked(h) for h in history] == [[1, 1, 1]] * steps


def test_start_iter_skips_the_first_steps():
    tokens = torch.full((1, 256), MASK)
    fn = table_logits(256)
    out, history = decode(fn, tokens, mask_id=MASK, steps=12, start_iter=2, generator=gen(), return_steps=True)
    assert len(fn.calls) == 10 and len(history) == 10
    assert [n_masked(h)[0] for h in history] == T12[2:]
    assert (out < K).all()


def test_reproducible_under_a_generator():
    tokens = torch.full((2, 64), MASK)
    a = decode(table_logits(64, scale=0.5), tokens, mask_id=MASK, steps=6, generator=gen(3))
    b = decode(table_logits(64, scale=0.5), tokens, mask_id=MASK, steps=6, generator=gen(3))
    c = decode(table_logits(64, scale=0.5), tokens, mask_id=MASK, steps=6, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_other_schedules_and_low_precision_logits():
    tokens = torch.full((2, 64), MASK)
    for schedule in ("linear", "log", "exp", "arccos", "pow1.5"):
        _, history = decode(table_logits(64), tokens, mask_id=MASK, steps=5, schedule=schedule, generator=gen(), return_steps=True)
        assert [n_masked(h)[0] for h in history] == masked_counts(64, 5, schedule)
    fn = table_logits(64)
    out = decode(lambda t: fn(t).to(torch.bfloat16), tokens, mask_id=MASK, steps=3, generator=gen())
    assert (out < K).all()


def test_classifier_free_guidance_formula_and_ramp():
    cond = torch.tensor([1.0, 0.0])
    uncond = torch.tensor([2.0, -5.0])  # cond − uncond = [−1, 5]: code 1 wins once s > 1/6
    c_fn = lambda t: cond.expand(t.shape[0], t.shape[1], -1)  # noqa: E731
    u_fn = lambda t: uncond.expand(t.shape[0], t.shape[1], -1)  # noqa: E731
    tokens = torch.full((1, 4), MASK)

    def first_step_tokens(scale, ramp):
        _, history = decode(c_fn, tokens, mask_id=MASK, steps=2, temperature=0, guidance_scale=scale,
                            guidance_ramp=ramp, uncond_logits_fn=u_fn, generator=gen(), return_steps=True)
        return set(history[0][0][history[0][0] != MASK].tolist())

    assert first_step_tokens(0.0, "constant") == {0}
    assert first_step_tokens(0.25, "constant") == {1}
    assert first_step_tokens(0.25, "linear") == {0}  # s_0 = 0.25·1/2 < 1/6
    out = decode(c_fn, tokens, mask_id=MASK, steps=2, temperature=0, guidance_scale=0.25, guidance_ramp="linear",
                 uncond_logits_fn=u_fn, generator=gen())
    assert (out == 1).sum() == 2  # step 1: s_1 = 0.25 -> the two tokens revealed last are code 1
    assert guidance_at(0, 4, 2.0, "linear") == 0.5 and guidance_at(3, 4, 2.0, "linear") == 2.0
    assert guidance_at(0, 4, 2.0) == 2.0


def test_bad_arguments_are_explained():
    tokens = torch.full((1, 8), MASK)
    fn = table_logits(8)
    with pytest.raises(ValueError, match="uncond_logits_fn"):
        decode(fn, tokens, mask_id=MASK, steps=2, guidance_scale=1.0)
    with pytest.raises(ValueError, match="constant, linear"):
        decode(fn, tokens, mask_id=MASK, steps=2, guidance_ramp="cosine")
    with pytest.raises(ValueError, match="start_iter"):
        decode(fn, tokens, mask_id=MASK, steps=2, start_iter=2)
    with pytest.raises(ValueError, match="steps"):
        decode(fn, tokens, mask_id=MASK, steps=0)
    with pytest.raises(ValueError, match="decode.schedule=cosin: must be a mask schedule"):
        decode(fn, tokens, mask_id=MASK, steps=2, schedule="cosin")
    with pytest.raises(ValueError, match="integer"):
        decode(fn, tokens.float(), mask_id=MASK, steps=2)
    with pytest.raises(ValueError, match="slice"):
        decode(table_logits(8, k=MASK + 1), tokens, mask_id=MASK, steps=2)
    with pytest.raises(ValueError, match=r"\(B, N, K\)"):
        decode(lambda t: torch.zeros(1, 7, K), tokens, mask_id=MASK, steps=2)
    with pytest.raises(ValueError, match="temperature"):
        decode(fn, tokens, mask_id=MASK, steps=2, temperature=-1.0)

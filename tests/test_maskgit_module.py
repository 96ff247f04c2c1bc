"""MaskGITModule: sequence layout, loss on masked tokens only, generation, learning on a toy task."""

from __future__ import annotations

import pytest
import torch

from lightning_mim.modules.maskgit import MaskGITModule
from _decode import decode_config

TINY_VQGAN = dict(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=16, code_dim=8, norm_groups=4)
TINY_TRANSFORMER = dict(width=32, depth=1, heads=2, mlp_dim=64, dropout=0.0, attn_dropout=0.0)


def make(**overrides) -> MaskGITModule:
    torch.manual_seed(0)
    kwargs = dict(
        transformer=TINY_TRANSFORMER,
        tokenizer={"arch": TINY_VQGAN, "ckpt": None},
        ratio={"_target_": "lightning_mim.masking.ScheduleRatio", "schedule": "cosine", "n_tokens": None},
        decode=decode_config(steps=4, choice_temperature=4.5, schedule="cosine"),
        optim={"lr": 1e-2, "warmup_steps": 0},
        num_classes=3,
        image_size=8,
    )
    kwargs.update(overrides)
    return MaskGITModule(**kwargs)


def test_layout_and_class_tokens():
    module = make()
    assert module.grid == (4, 4) and module.n_tokens == 16
    assert module.layout.mask_id == 16 + 3 and module.layout.vocab_size == 20
    labels = torch.tensor([0, 2])
    assert module.class_tokens(labels, 2).tolist() == [16, 18]
    assert module.class_tokens(None, 2).tolist() == [19, 19]  # "no class" = the mask id
    logits = module.logits(torch.zeros(2, 16, dtype=torch.long), module.class_tokens(labels, 2))
    assert logits.shape == (2, 16, 16)  # codebook logits only: class and mask ids can never be predicted


def test_loss_counts_only_masked_positions(monkeypatch):
    module = make()
    tokens = torch.randint(0, 16, (4, 16))
    seen = {}

    def fake_loss(logits, targets, mask, **kwargs):
        seen["mask"] = mask
        return logits.sum() * 0

    monkeypatch.setattr("lightning_mim.modules.maskgit.masked_token_loss", fake_loss)
    module._loss((tokens, torch.zeros(4, dtype=torch.long)))
    counts = seen["mask"].sum(1)
    assert (counts >= 1).all() and (counts <= 16).all()


def test_images_are_tokenized_on_the_fly():
    module = make()
    images = torch.rand(2, 3, 8, 8)
    tokens, labels = module.to_tokens((images, torch.tensor([1, 2])))
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    assert torch.equal(tokens, module.tokenizer.encode_to_indices(images).view(2, -1))


def test_generate_shapes_range_and_reproducibility():
    module = make()
    labels = torch.tensor([0, 1, 2])
    a = module.generate(labels, generator=torch.Generator().manual_seed(3))
    b = module.generate(labels, generator=torch.Generator().manual_seed(3))
    assert a.shape == (3, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    images, steps = module.generate(labels, return_steps=True, steps=3)
    assert len(steps) == 3 and all(s.shape == images.shape for s in steps)


def test_guidance_passes_the_unconditional_model_to_decoding(monkeypatch):
    module = make(class_dropout=0.1)
    captured = {}

    def fake_decode(logits_fn, tokens, **kwargs):
        captured.update(kwargs, cond=logits_fn(tokens), uncond=kwargs["uncond_logits_fn"](tokens))
        return tokens.clamp(max=0)

    monkeypatch.setattr("lightning_mim.modules.stage2.decode", fake_decode)
    module.generate_tokens(torch.tensor([0, 1]), 2, None, guidance_scale=3.0, guidance_ramp="linear")
    assert captured["guidance_scale"] == 3.0 and captured["guidance_ramp"] == "linear"
    # the unconditional branch puts the "no class" id at position 0, the conditional one the class ids
    cond_ids = module.class_tokens(torch.tensor([0, 1]), 2)
    tokens = torch.full((2, 16), module.layout.mask_id)
    assert torch.allclose(captured["cond"], module.logits(tokens, cond_ids))
    assert torch.allclose(captured["uncond"], module.logits(tokens, module.class_tokens(None, 2)))


def test_invalid_class_dropout():
    with pytest.raises(ValueError, match="class_dropout"):
        make(class_dropout=1.0)


def default_optimizer(module: MaskGITModule, **changes) -> torch.optim.Optimizer:
    """The optimiser of conf/model/maskgit.yaml (name, betas, weight decay), with `changes`."""
    from omegaconf import OmegaConf

    from lightning_mim.orchestration.config import config_dir
    from lightning_mim.optim import build_optimizer

    optim = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "maskgit.yaml").optim)
    return build_optimizer(module.transformer, **{**optim, **changes})["optimizer"]


def test_learns_a_class_conditional_toy_task():
    """Tokens are a function of the class only: after training with the config's optimiser (the
    official weight decay 0.045 included), decoding reproduces them. With torch's coupled-L2 Adam
    the class embeddings, whose gradients are tiny, decay to zero and this fails."""
    module = make()
    optimizer = default_optimizer(module, lr=3e-3, warmup_steps=0)
    table = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(3).repeat(8)
    first = None
    for _ in range(150):
        loss, _ = module._loss((table[labels], labels))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    tokens = module.generate_tokens(torch.arange(3), 3, torch.Generator().manual_seed(0))
    assert (tokens == table).float().mean() > 0.9


def test_features_for_linear_probing():
    module = make()
    features = module.encode_features(torch.rand(5, 3, 8, 8))
    assert features.shape == (5, 32)

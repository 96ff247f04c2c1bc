"""Loading official MAGE checkpoints (layout: tests/reference/*.json, docs/FIDELITY.md "Checkpoint layouts")."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lightning_mim.checkpoints.mage import load_mage, mage_config, split_mage_state_dict
from lightning_mim.nn.mage import MAGE

REFERENCE = Path(__file__).resolve().parent / "reference"  # parameter name -> shape tables
IGNORED = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "token_emb.position_ids",
           "patch_embed.proj.weight", "patch_embed.proj.bias", "decoder_pred.weight", "decoder_pred.bias"}


def read_table(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in json.loads((REFERENCE / name).read_text()).items()}


def official_state(with_vqgan: bool = True) -> dict[str, torch.Tensor]:
    """An official-layout ViT-B checkpoint: zeros (cheap) except a few tensors with known values."""
    state = {k: torch.zeros(s) for k, s in read_table("mage_vitb_keys.json").items()}
    g = torch.Generator().manual_seed(0)
    for key in ("blocks.3.attn.qkv.weight", "decoder_blocks.7.mlp.fc2.bias", "token_emb.word_embeddings.weight",
                "mlm_layer.bias", "decoder_pos_embed_learned"):
        state[key] = torch.randn(state[key].shape, generator=g)
    state["token_emb.position_ids"] = torch.arange(257)[None]
    if with_vqgan:
        state.update({f"vqgan.{k}": torch.zeros(s) for k, s in read_table("vqgan_f16_keys.json").items()})
    return state


@pytest.fixture(scope="module")
def base_state():
    return official_state()


def test_our_names_and_shapes_match_the_official_layout():
    official = read_table("mage_vitb_keys.json")
    assert len(official) == 265
    with torch.device("meta"):
        ours = MAGE(**mage_config("base")).state_dict()
    expected = {k: s for k, s in official.items() if k not in IGNORED}
    expected["mlm_layer.bias"] = (2025,)  # stored (1, 1, 2025) officially; the loader reshapes
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert sum(v.numel() for v in ours.values()) == 144_896_745


def test_strict_load_of_base_checkpoint(base_state):
    model, vqgan = load_mage({"model": base_state, "epoch": 1599}, "base")
    assert isinstance(model, MAGE)
    sd = model.state_dict()
    for key in ("blocks.3.attn.qkv.weight", "decoder_blocks.7.mlp.fc2.bias", "token_emb.word_embeddings.weight",
                "decoder_pos_embed_learned"):
        assert torch.equal(sd[key], base_state[key]), key
    assert torch.equal(sd["mlm_layer.bias"], base_state["mlm_layer.bias"].reshape(-1))
    assert torch.equal(sd["norm.weight"], torch.zeros(768))  # every other tensor came from the file too
    assert vqgan is not None and len(vqgan) == 168
    assert "quantize.embedding.weight" in vqgan and tuple(vqgan["encoder.conv_in.weight"].shape) == (128, 3, 3, 3)
    assert len(model.blocks) == 12 and len(model.decoder_blocks) == 8
    assert model.blocks[0].attn.heads == 12 and model.decoder_blocks[0].attn.heads == 16


def test_size_is_inferred_and_vqgan_optional(base_state):
    bare = {k: v for k, v in base_state.items() if not k.startswith("vqgan.")}
    model, vqgan = load_mage(bare, size=None)
    assert vqgan is None and model.token_emb.word_embeddings.embedding_dim == 768


def test_missing_and_unexpected_keys_are_listed_in_one_error(base_state):
    broken = dict(base_state)
    del broken["decoder_norm.bias"]
    broken["head.weight"] = torch.zeros(3)
    with pytest.raises(KeyError) as info:
        load_mage(broken, "base")
    assert "decoder_norm.bias" in str(info.value) and "head.weight" in str(info.value)
    model, _ = load_mage(broken, "base", strict=False)  # lenient: loads what matches
    assert torch.equal(model.state_dict()["blocks.3.attn.qkv.weight"], base_state["blocks.3.attn.qkv.weight"])


def test_wrong_shape_or_size_errors(base_state):
    bad = dict(base_state)
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(3072, 700)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        load_mage(bad, "base")
    with pytest.raises(KeyError, match="missing"):
        load_mage(base_state, "large")  # 24 blocks expected, 12 found (and widths differ)
    with pytest.raises(ValueError, match="base, large"):
        mage_config("huge")


def tiny_config() -> dict:
    return dict(enc_width=32, enc_depth=2, enc_heads=4, dec_width=32, dec_depth=1, dec_heads=4)


def test_file_with_argparse_namespace_loads_with_weights_only(tmp_path):
    source = MAGE(**{**mage_config("base"), **tiny_config()})
    state = dict(source.state_dict())
    state["mlm_layer.bias"] = state["mlm_layer.bias"].reshape(1, 1, -1)  # official storage
    state.update({"cls_token": torch.zeros(1, 1, 32), "decoder_pred.weight": torch.zeros(768, 32)})
    path = tmp_path / "checkpoint-1599.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 1599, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="mage_vit_base_patch16", blr=1.5e-4)}, path)
    model, vqgan = load_mage(path, "base", config=tiny_config())  # weights_only=True by default
    assert vqgan is None
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.requires_grad for p in model.parameters())
    tok = torch.randint(0, 1024, (2, 256))
    mask = torch.zeros(2, 256, dtype=torch.bool)
    mask[:, :100] = True
    torch.testing.assert_close(model.eval()(tok, mask), source.eval()(tok, mask), rtol=0, atol=0)


class NotAllowed:  # any class outside the weights-only allowlist
    pass


def test_weights_only_still_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": NotAllowed()}, path)
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_mage(path, "base")


def test_ddp_prefix_and_mask_token_padding():
    source = MAGE(**{**mage_config("base"), **tiny_config(), "pad_with": "mask_token"})
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    model, _ = load_mage(state, "base", config={**tiny_config(), "pad_with": "mask_token"})
    assert torch.equal(model.mask_token, source.mask_token)  # kept: our model uses it
    ours, _ = split_mage_state_dict({"mask_token": torch.zeros(1, 1, 4), "norm.weight": torch.ones(4)})
    assert set(ours) == {"norm.weight"}  # ignored when the model pads with [C]


def test_large_config_sizes():
    with torch.device("meta"):
        model = MAGE(**mage_config("large"))
    assert len(model.blocks) == 24 and model.blocks[0].attn.heads == 16
    assert model.decoder_embed.in_features == 1024 and model.decoder_embed.out_features == 1024
    assert len(model.decoder_blocks) == 8 and model.decoder_blocks[0].attn.heads == 16
    cfg = mage_config("base")
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["fake_class_id"], cfg["codebook_size"]) == (2025, 257, 1100, 1024)

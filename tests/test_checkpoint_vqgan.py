"""Loading tokenizer checkpoints: the official MAGE/MaskGIT layout (tests/reference table) and our own.

The table is docs/FIDELITY.md "Checkpoint layouts": MAGE's `vqgan_jax_strongaug.ckpt` as
parameter name -> shape, in state-dict order.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_mim.checkpoints.vqgan import (
    CheckpointMismatchError,
    build_vqgan,
    load_state_dict_strict,
    load_tokenizer,
    load_vqgan,
    official_maskgit_f16_config,
)
from lightning_mim.checkpoints.vqgan import official_state_dict as unwrap_official
from lightning_mim.nn.vqgan import VQGAN

REFERENCE = Path(__file__).resolve().parent / "reference" / "vqgan_f16_keys.json"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _reference_layout() -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(shape)) for key, shape in json.loads(REFERENCE.read_text()).items()]  # file order kept


@pytest.fixture(scope="module")
def official_state_dict() -> dict[str, torch.Tensor]:
    """A state dict built only from the reference table: official names and shapes, random values."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in _reference_layout():
        if key.endswith(("norm1.weight", "norm2.weight", "norm_out.weight")):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            sd[key] = 0.03 * torch.randn(shape, generator=gen)
    return sd


def test_reference_table_is_the_official_layout(official_state_dict):
    layout = _reference_layout()
    assert len(layout) == 168
    assert sum(torch.Size(s).numel() for _, s in layout) == 54_515_587
    ours = VQGAN(**official_maskgit_f16_config()).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == layout  # same names, shapes and order


def test_official_layout_loads_strictly_and_tokenizes_like_the_weights_used_directly(tmp_path, official_state_dict):
    sd = official_state_dict
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": sd}, path)

    loaded = load_tokenizer(path)
    assert not loaded.training
    direct = VQGAN(**official_maskgit_f16_config()).eval()
    direct.load_state_dict(sd, strict=True)
    for key, value in sd.items():
        assert torch.equal(loaded.state_dict()[key], value)

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = loaded.encode_to_indices(x)
    assert tokens.shape == (2, 2, 2)
    assert torch.equal(tokens, direct.encode_to_indices(x))
    torch.testing.assert_close(loaded.decode_indices(tokens), direct.decode_indices(tokens), rtol=0, atol=0)
    # load_vqgan recognises the official layout too
    assert torch.equal(load_vqgan(path).encode_to_indices(x), tokens)


def test_official_containers_are_unwrapped(official_state_dict):
    sd = official_state_dict
    mage = {"model": {**{f"vqgan.{k}": v for k, v in sd.items()}, "token_emb.word_embeddings.weight": torch.zeros(3, 2)}}
    for container in (sd, {"state_dict": sd}, mage):
        unwrapped = unwrap_official(container)
        assert list(unwrapped) == list(sd)
        assert all(unwrapped[k] is sd[k] for k in sd)


def _official_on_meta() -> VQGAN:
    with torch.device("meta"):
        return VQGAN(**official_maskgit_f16_config())


def test_wrong_shape_is_listed(tmp_path, official_state_dict):
    sd = dict(official_state_dict)
    sd["quantize.embedding.weight"] = torch.zeros(512, 256)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches \(1\):\n  quantize.embedding.weight: checkpoint \(512, 256\) vs model \(1024, 256\)"):
        load_state_dict_strict(_official_on_meta(), sd, assign=True)
    small = {"quantize.embedding.weight": torch.zeros(1024, 128)}  # through the file loader as well
    torch.save(small, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint \(1024, 128\) vs model \(1024, 256\)"):
        load_tokenizer(tmp_path / "bad.ckpt")


def test_missing_and_unexpected_keys_are_listed_in_one_error(official_state_dict):
    sd = dict(official_state_dict)
    del sd["encoder.conv_in.weight"]
    del sd["decoder.up.3.block.0.nin_shortcut.weight"]
    sd["encoder.conv_in.bias"] = torch.zeros(128)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(_official_on_meta(), sd, source="bad.ckpt", assign=True)
    text = str(info.value)
    assert text.startswith("bad.ckpt does not match the tokenizer (168 tensors expected, 167 given)")
    assert "missing keys (2):\n  encoder.conv_in.weight\n  decoder.up.3.block.0.nin_shortcut.weight" in text
    assert "unexpected keys (1):\n  encoder.conv_in.bias" in text
    assert "shape mismatches" not in text


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer checkpoint not found"):
        load_vqgan(tmp_path / "nope.ckpt")


TINY = dict(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=16, code_dim=4, norm_groups=4,
            quantizer={"restart_after": 5})


def test_lightning_tokenizer_checkpoint_loads_with_weights_only(tmp_path):
    from lightning_mim.modules.tokenizer import TokenizerModule

    torch.manual_seed(0)
    module = TokenizerModule(vqgan=TINY, loss={"gan_weight": 0.1, "perceptual_weight": 0.0, "discriminator": {"num_layers": 1, "base_channels": 8}})
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain hyper-parameters: no pickle needed
    assert raw["hyper_parameters"]["vqgan"]["codebook_size"] == 16
    vq = load_vqgan(path)
    assert isinstance(vq, VQGAN) and not vq.training
    x = torch.rand(3, 3, 16, 16)
    module.vqgan.eval()
    assert torch.equal(vq.encode_to_indices(x), module.vqgan.encode_to_indices(x))
    for key, value in module.vqgan.state_dict().items():
        assert torch.equal(vq.state_dict()[key], value)


def test_stage2_style_checkpoint_and_unknown_lightning_checkpoint(tmp_path):
    vq = build_vqgan(TINY)
    sd = {f"tokenizer.{k}": v for k, v in vq.state_dict().items()}
    sd["transformer.w"] = torch.zeros(2)
    torch.save({"hyper_parameters": {"tokenizer": {"arch": TINY, "ckpt": None}}, "state_dict": sd}, tmp_path / "s2.ckpt")
    loaded = load_vqgan(tmp_path / "s2.ckpt")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.encode_to_indices(x), vq.eval().encode_to_indices(x))

    torch.save({"hyper_parameters": {"lr": 1.0}, "state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="neither a TokenizerModule"):
        load_vqgan(tmp_path / "other.ckpt")


class Opaque:  # not an allow-listed type: weights_only=True must refuse it
    pass


def test_weights_only_refusal_explains_the_opt_out(tmp_path):
    torch.save({"state_dict": {}, "extra": Opaque()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_vqgan(tmp_path / "pickled.ckpt")

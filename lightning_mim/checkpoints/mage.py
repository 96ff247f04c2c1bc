"""Official MAGE pre-training checkpoints (`LTH14/mage` `models_mage.py`) -> our `nn.mage.MAGE`.

A checkpoint is `{'model': state_dict, ...}` (or a bare state dict). Besides our parameters it holds:
- modules the official forward pass never uses (`cls_token`, `pos_embed`, `patch_embed.*`,
  `mask_token` unless we pad with a mask token, `decoder_pos_embed`, `decoder_pred.*`) and the
  saved buffer `token_emb.position_ids`: ignored;
- the frozen tokenizer under `vqgan.`: returned separately (prefix stripped) for
  `lightning_mim.checkpoints.vqgan` to build the tokenizer from.
Anything else missing or unexpected is reported in one error.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_mim.nn.mage import MAGE
from lightning_mim.nn.vqgan import official_maskgit_f16_config

SIZES = {
    # models_mage.py: mage_vit_base_patch16 / mage_vit_large_patch16
    "base": dict(enc_width=768, enc_depth=12, enc_heads=12, dec_width=768, dec_depth=8, dec_heads=16),
    "large": dict(enc_width=1024, enc_depth=24, enc_heads=16, dec_width=1024, dec_depth=8, dec_heads=16),
}
UNUSED_KEYS = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "token_emb.position_ids")
UNUSED_PREFIXES = ("patch_embed.", "decoder_pred.")
VQGAN_PREFIX = "vqgan."
CHECKPOINT_FORMATS = ("auto", "lightning", "official")
# Architecture kwargs of `nn.mage.MAGE` that only the decoder or the masking use; the encoder ignores them.
ENCODER_KEYS = (
    "vocab_size", "n_positions", "codebook_size", "enc_width", "enc_depth", "enc_heads", "mlp_ratio",
    "fake_class_id", "input_mode", "continuous_dim", "attn_fp32",
)


def mage_config(size: str = "base") -> dict[str, Any]:
    """Keyword arguments of `MAGE` for the official ViT-B / ViT-L models (1024 codes + 1000 classes
    + mask = vocab 2025, 257 positions, fake class 1100, MLP ratio 4, dropout 0.1, drop 0.5)."""
    if size not in SIZES:
        raise ValueError(f"unknown MAGE size {size!r}; valid: {', '.join(SIZES)}")
    return dict(
        vocab_size=2025,
        n_positions=257,
        codebook_size=1024,
        **SIZES[size],
        mlp_ratio=4.0,
        dropout=0.1,
        fake_class_id=1100,
        drop_ratio=0.5,
        pad_with="cls",
    )


def split_mage_state_dict(
    state: Mapping[str, Tensor], model_keys: set[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Official state dict -> (our MAGE keys, tokenizer state dict without `vqgan.` or None).

    Drops the unused official modules (those also in `model_keys`, e.g. `mask_token` for
    `pad_with="mask_token"`, are kept) and reshapes the MLM bias (1, 1, V) -> (V,).
    """
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    model_keys = model_keys or set()
    ours: dict[str, Tensor] = {}
    vqgan: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(VQGAN_PREFIX):
            vqgan[key[len(VQGAN_PREFIX) :]] = value
        elif key not in model_keys and (key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)):
            continue
        elif key == "mlm_layer.bias":
            ours[key] = value.reshape(-1)
        else:
            ours[key] = value
    return ours, (vqgan or None)


def _infer_size(state: Mapping[str, Tensor]) -> str:
    key = "token_emb.word_embeddings.weight"
    if key not in state:
        raise KeyError(f"not a MAGE checkpoint: no {key!r} (found e.g. {sorted(state)[:5]})")
    width = state[key].shape[1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, cfg in SIZES.items():
        if cfg["enc_width"] == width and cfg["enc_depth"] == depth:
            return name
    raise ValueError(f"checkpoint encoder (width {width}, depth {depth}) matches no official size; pass config=")


def torch_load_mage(
    path: str | Path, *, weights_only: bool = True, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """`torch.load` of a MAGE checkpoint (official or ours). The official `save_model` also pickles
    `args` (an argparse.Namespace, a plain attribute bag): that one class is allowed, so
    `weights_only=True` loads the real files."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def load_mage(
    path: str | Path | Mapping[str, Any],
    size: str | None = "base",
    *,
    weights_only: bool = True,
    strict: bool = True,
    config: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[MAGE, dict[str, Tensor] | None]:
    """Load an official MAGE checkpoint (file, or an already loaded dict) into `MAGE`.

    `size`: "base" | "large" (`mage_config`), or None to infer it from the encoder's width and depth.
    `config` overrides/extends the architecture kwargs (e.g. a model trained with other sizes).
    Returns (model, tokenizer state dict with the `vqgan.` prefix stripped, or None if absent).
    With `strict`, any missing or unexpected key (after ignoring the official unused modules)
    raises one `KeyError` listing them all; shape mismatches always raise. When every tensor is
    present the model adopts the checkpoint's tensors (cast to float32) instead of copying them, so
    a dict passed in shares memory with the model.
    """
    if isinstance(path, Mapping):
        ckpt = path
    else:
        ckpt = torch_load_mage(path, weights_only=weights_only, map_location=map_location)
    state = ckpt["model"] if "model" in ckpt and isinstance(ckpt["model"], Mapping) else ckpt
    if size is None:
        size = _infer_size(state)
    kwargs = {**mage_config(size), **dict(config or {})}
    with torch.device("meta"):  # names and shapes only: check before allocating ~100s of M parameters
        expected = MAGE(**kwargs).state_dict()
    ours, vqgan = split_mage_state_dict(state, set(expected))
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(
            f"MAGE checkpoint does not match the {size!r} model: missing {missing or 'none'}; "
            f"unexpected {unexpected or 'none'}"
        )
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in ours.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if shapes:
        raise ValueError(f"MAGE checkpoint shapes do not match the {size!r} model: " + "; ".join(shapes))
    ours = {k: v.to(expected[k].dtype) for k, v in ours.items() if k in expected}
    if missing:  # lenient load: a fully initialised model, overwritten where the checkpoint has values
        model = MAGE(**kwargs)
        model.load_state_dict(ours, strict=False)
    else:  # every tensor comes from the checkpoint: adopt them instead of initialising first
        with torch.device("meta"):
            model = MAGE(**kwargs)
        model.load_state_dict(ours, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:  # a non-persistent buffer would need initialising here
            raise RuntimeError(f"tensors not filled from the checkpoint: {left}")
    return model, vqgan


# -- the encoder of a pre-trained MAGE, for fine-tuning ---------------------------------------------
def load_mage_encoder(
    path: str | Path,
    *,
    checkpoint_format: str = "auto",
    official_size: str | None = None,
    tokenizer_ckpt: str | None = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read a pre-trained MAGE: {"encoder": MAGE kwargs (encoder_only), "encoder_state": its tensors,
    "tokenizer_arch": VQGAN kwargs, "tokenizer_state": tokenizer tensors or None (then `tokenizer_ckpt`)}.

    `checkpoint_format`: `lightning` (ours: `state_dict` + `hyper_parameters` of MAGEModule),
    `official` (`{'model': ...}` of LTH14/mage, through `load_mage`), or `auto` (by the keys).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; valid: {', '.join(CHECKPOINT_FORMATS)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained={path}: no such checkpoint file (a last.ckpt of experiment=digits_mage, or an official MAGE .pth)"
        )
    ckpt = torch_load_mage(path, weights_only=weights_only)
    if checkpoint_format == "auto":
        checkpoint_format = "lightning" if "state_dict" in ckpt and "hyper_parameters" in ckpt else "official"
    if checkpoint_format == "lightning":
        return _from_lightning(ckpt, path)
    return _from_official(ckpt, official_size, tokenizer_ckpt)


def _from_lightning(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    hp, state = ckpt.get("hyper_parameters") or {}, ckpt.get("state_dict") or {}
    if "arch" not in hp or "mage.token_emb.word_embeddings.weight" not in state:
        raise KeyError(f"{path} is not a MAGEModule checkpoint (no hyper_parameters.arch / mage.* weights)")
    tok_arch = dict((hp.get("tokenizer") or {}).get("arch") or {})
    if not tok_arch:
        raise KeyError(f"{path}: hyper_parameters.tokenizer.arch is missing; cannot rebuild the tokenizer")
    words = state["mage.token_emb.word_embeddings.weight"]
    codebook = int(tok_arch.get("codebook_size", 1024))
    arch = dict(hp["arch"])
    encoder = {
        **{k: v for k, v in arch.items() if k in ENCODER_KEYS},
        "vocab_size": int(words.shape[0]),
        "n_positions": int(state["mage.token_emb.position_embeddings.weight"].shape[0]),
        "codebook_size": codebook,
        "fake_class_id": int(hp.get("fake_class_id") if hp.get("fake_class_id") is not None else codebook),
    }
    if arch.get("input_mode", "tokens") == "continuous":
        encoder["continuous_dim"] = int(state["mage.continuous_proj.weight"].shape[1])
    enc_state = {k[len("mage.") :]: v for k, v in state.items() if k.startswith("mage.")}
    tok_state = {k[len("tokenizer.") :]: v for k, v in state.items() if k.startswith("tokenizer.")}
    return {"encoder": encoder, "encoder_state": enc_state, "tokenizer_arch": tok_arch, "tokenizer_state": tok_state or None}


def _from_official(ckpt: dict[str, Any], size: str | None, tokenizer_ckpt: str | None) -> dict[str, Any]:
    model, vqgan = load_mage(ckpt, size)
    size = size or next(n for n in ("base", "large") if mage_config(n)["enc_depth"] == len(model.blocks))
    encoder = {k: v for k, v in mage_config(size).items() if k in ENCODER_KEYS}
    if vqgan is None and not tokenizer_ckpt:
        raise ValueError(
            "the official MAGE checkpoint holds no tokenizer (vqgan.*): set model.tokenizer_ckpt="
            "/path/to/vqgan_jax_strongaug.ckpt"
        )
    return {
        "encoder": encoder, "encoder_state": model.state_dict(),
        "tokenizer_arch": official_maskgit_f16_config(), "tokenizer_state": vqgan,
    }

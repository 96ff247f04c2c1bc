"""MAGEFinetuneModule (`model=mage_finetune`): loading the pre-trained encoder, layer-wise lr decay
(MAE/MAGE `param_groups_lrd`), label smoothing, mixup/cutmix soft targets, and that it learns digits."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from lightning_mim.orchestration.config import compose
from lightning_mim.data.digits import digits_arrays
from lightning_mim.checkpoints.mage import load_mage_encoder
from lightning_mim.data.mixing import mixup_transform
from lightning_mim.modules.mage import MAGEModule
from lightning_mim.modules.mage_finetune import MAGEFinetuneModule
from lightning_mim.optim import build_optimizer, layer_decay_param_groups, vit_layer_id
from _decode import decode_config

warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer

K = 16
TOKENIZER = {
    "ckpt": None,
    "arch": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1, "codebook_size": K, "code_dim": 8, "norm_groups": 4},
}
ARCH = {"enc_width": 32, "enc_depth": 2, "enc_heads": 4, "dec_width": 24, "dec_depth": 1, "dec_heads": 2, "dropout": 0.0}
RATIO = {"_target_": "lightning_mim.masking.TruncGaussRatio", "mean": 0.55, "std": 0.25, "low": 0.5, "high": 1.0}
PRE_OPTIM = {"name": "adamw", "lr": 1e-3, "warmup_steps": 0, "schedule": "cosine"}
OPTIM = {"lr": 1e-3, "warmup_steps": 0, "total_steps": 100, "weight_decay": 0.05}


pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain_module(image_size: int = 8, seed: int = 0, **arch) -> MAGEModule:
    torch.manual_seed(seed)
    return MAGEModule(
        arch={**ARCH, **arch}, tokenizer=TOKENIZER, ratio=RATIO, decode=decode_config(steps=4), optim=PRE_OPTIM, image_size=image_size
    )


def save_lightning_ckpt(module: MAGEModule, path) -> str:
    """What Lightning writes for a MAGEModule run (the keys the fine-tune loader reads)."""
    hparams = {k: v for k, v in module.hparams.items()}
    hparams["tokenizer"] = {**hparams["tokenizer"], "arch": dict(module.tokenizer.config)}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 0}, path)
    return str(path)


@pytest.fixture
def ckpt(tmp_path):
    pre = pretrain_module()
    with torch.no_grad():  # make the "pre-trained" weights distinguishable from any fresh init
        for p in pre.mage.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return pre, save_lightning_ckpt(pre, tmp_path / "last.ckpt")


def finetune(path: str, image_size: int = 8, **kw) -> MAGEFinetuneModule:
    args = dict(pretrained=path, num_classes=10, image_size=image_size, optim=OPTIM)
    args.update(kw)
    return MAGEFinetuneModule(**args)


# -- loading -------------------------------------------------------------------------------------------
def test_encoder_weights_equal_the_checkpoint_and_decoder_is_dropped(ckpt):
    pre, path = ckpt
    m = finetune(path)
    enc = m.encoder.state_dict()
    want = pre.mage.state_dict()
    # every encoder tensor (embeddings + blocks) comes from the checkpoint, bit for bit
    assert set(enc) == {k for k in want if k.startswith(("token_emb.", "blocks."))}
    for k, v in enc.items():
        assert torch.equal(v, want[k]), k
    # the frozen tokenizer is the checkpoint's own
    for k, v in m.tokenizer.state_dict().items():
        assert torch.equal(v, pre.tokenizer.state_dict()[k]), k
    assert not any(p.requires_grad for p in m.tokenizer.parameters())
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.startswith(("encoder.decoder", "encoder.mlm_layer", "encoder.norm.")) for n in names)
    # official --global_pool head: fc_norm LayerNorm(1, 0) and a head drawn with std 2e-5
    assert isinstance(m.fc_norm, torch.nn.LayerNorm) and m.fc_norm.eps == 1e-6
    assert m.head.weight.abs().max() <= 4e-5 and m.head.weight.std() > 0 and (m.head.bias == 0).all()


def test_random_init_keeps_architecture_and_tokenizer_but_not_the_encoder(ckpt):
    pre, path = ckpt
    scratch = finetune(path, init="random")
    assert torch.equal(scratch.tokenizer.quantize.embedding.weight, pre.tokenizer.quantize.embedding.weight)
    w = scratch.encoder.blocks[0].attn.qkv.weight
    assert w.shape == pre.mage.blocks[0].attn.qkv.weight.shape and not torch.equal(w, pre.mage.blocks[0].attn.qkv.weight)


def test_pooled_features_are_the_mean_of_image_token_outputs(ckpt):
    _, path = ckpt
    m = finetune(path).eval()
    images = torch.rand(3, 3, 8, 8)
    tokens = m.tokenizer.encode_to_indices(images).flatten(1)
    x = m.encoder.token_emb(torch.cat([torch.full((3, 1), m.encoder.fake_class_id), tokens], 1))
    for blk in m.encoder.blocks:
        x = blk(x)
    expected = m.head(m.fc_norm(x[:, 1:].mean(1)))  # class slot excluded, no final encoder norm
    torch.testing.assert_close(m(images), expected)
    torch.testing.assert_close(m(tokens), expected)  # token batches are accepted too


def test_missing_pretrained_names_the_key_to_set(tmp_path):
    with pytest.raises(ValueError, match="model.pretrained"):
        finetune(None)
    with pytest.raises(FileNotFoundError, match=r"model.pretrained=.*nope.ckpt"):
        finetune(str(tmp_path / "nope.ckpt"))
    cfg = compose(["experiment=digits_mage_finetune", f"paths.home={tmp_path}"])
    assert cfg.model._target_.endswith("MAGEFinetuneModule")
    with pytest.raises(Exception, match="model.pretrained"):
        instantiate(cfg.model, _recursive_=False, _convert_="all")


def test_not_a_mage_checkpoint_and_bad_options_are_clear(tmp_path, ckpt):
    _, path = ckpt
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {}}, bad)
    with pytest.raises(KeyError, match="not a MAGEModule checkpoint"):
        finetune(str(bad))
    for kw, match in [
        (dict(init="scratch"), "valid: pretrained, random"),
        (dict(head_norm="rms"), "valid: layernorm, batchnorm"),
        (dict(layer_decay=0.0), "layer_decay"),
        (dict(checkpoint_format="jax"), "valid: auto, lightning, official"),
    ]:
        with pytest.raises(ValueError, match=match):
            finetune(path, **kw)


def test_official_checkpoint_layout_loads_through_load_mage(tmp_path, monkeypatch):
    """An official `{'model': ...}` file (with its `vqgan.*` tokenizer) -> the same encoder tensors."""
    import lightning_mim.checkpoints.mage as cm
    from lightning_mim.nn.mage import MAGE
    from lightning_mim.nn.vqgan import VQGAN

    tiny = dict(enc_width=32, enc_depth=2, enc_heads=4, dec_width=24, dec_depth=1, dec_heads=2)
    monkeypatch.setitem(cm.SIZES, "base", tiny)  # official vocab 2025 / 257 positions, tiny widths
    monkeypatch.setattr(cm, "official_maskgit_f16_config", lambda: dict(TOKENIZER["arch"]))
    torch.manual_seed(0)
    full = MAGE(**cm.mage_config("base"))
    tok = VQGAN(**TOKENIZER["arch"])
    state = {**full.state_dict(), **{f"vqgan.{k}": v for k, v in tok.state_dict().items()}}
    state["mlm_layer.bias"] = state["mlm_layer.bias"].view(1, 1, -1)  # official layout
    state["cls_token"] = torch.zeros(1, 1, 32)  # an unused official module: ignored
    path = tmp_path / "mage-official.pth"
    torch.save({"model": state}, path)
    info = load_mage_encoder(path)
    assert info["encoder"]["fake_class_id"] == 1100 and info["encoder"]["vocab_size"] == 2025
    m = finetune(str(path), image_size=32, checkpoint_format="official", official_size="base")  # 16x16 tokens
    for k, v in m.encoder.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    for k, v in m.tokenizer.state_dict().items():
        assert torch.equal(v, tok.state_dict()[k]), k
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_finetuned_checkpoint_rebuilds_without_the_pretrained_file(tmp_path, ckpt):
    _, path = ckpt
    m = finetune(path)
    saved = {"hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(saved)
    hp = saved["hyper_parameters"]
    hp["pretrained"] = str(tmp_path / "gone.ckpt")
    again = MAGEFinetuneModule(**hp)
    again.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(again.eval()(x), m.eval()(x))


# -- layer-wise lr decay ------------------------------------------------------------------------------
def test_layer_ids_follow_mae_get_layer_id_for_vit():
    assert vit_layer_id("token_emb.word_embeddings.weight", 12) == 0
    assert vit_layer_id("token_emb.position_embeddings.weight", 12) == 0
    assert vit_layer_id("continuous_proj.weight", 12) == 0
    assert vit_layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert vit_layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert vit_layer_id("fc_norm.weight", 12) == 13
    assert vit_layer_id("head.weight", 12) == 13


def test_layer_decay_scales_per_group_are_exact(ckpt):
    _, path = ckpt
    m = finetune(path, layer_decay=0.5)  # depth 2: L = 3
    groups = m.param_groups()
    scales = {(g["layer"], g["weight_decay"] > 0): g["lr_scale"] for g in groups}
    assert scales == {
        (0, False): 0.125, (0, True): 0.125,  # embeddings: 0.5^3
        (1, False): 0.25, (1, True): 0.25,  # blocks.0: 0.5^2
        (2, False): 0.5, (2, True): 0.5,  # blocks.1: 0.5^1
        (3, False): 1.0, (3, True): 1.0,  # fc_norm + head: 0.5^0
    }
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["weight_decay"] == 0.05 and by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["fc_norm.weight"]["weight_decay"] == 0.0
    assert by_name["token_emb.word_embeddings.weight"]["weight_decay"] == 0.05  # 2-D: decayed (official)
    assert by_name["blocks.1.attn.qkv.bias"]["lr_scale"] == 0.5
    # every trainable parameter exactly once; the frozen tokenizer never
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in m.parameters() if p.requires_grad)
    assert not {id(p) for p in m.tokenizer.parameters()} & set(ids)


def test_layer_decay_vit_b_default_values():
    """ViT-B (12 blocks) at MAGE's 0.65: scale 0.65^(13 - layer)."""
    named = [("token_emb.word_embeddings.weight", torch.nn.Parameter(torch.zeros(2, 2)))]
    named += [(f"blocks.{j}.attn.qkv.weight", torch.nn.Parameter(torch.zeros(2, 2))) for j in range(12)]
    named += [("head.weight", torch.nn.Parameter(torch.zeros(2, 2)))]
    groups = layer_decay_param_groups(named, depth=12, layer_decay=0.65, weight_decay=0.05)
    scales = [g["lr_scale"] for g in groups]
    assert scales[0] == pytest.approx(0.003697205891018715, rel=1e-12)  # 0.65^13
    assert scales[1] == pytest.approx(0.005688009063105715, rel=1e-12)  # blocks.0: 0.65^12
    assert scales[12] == pytest.approx(0.65) and scales[13] == 1.0
    opt = build_optimizer(None, lr=1e-3, groups=groups, weight_decay=0.05)["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * s for s in scales])


def test_optimizer_applies_scaled_lrs_with_warmup_and_cosine(ckpt):
    _, path = ckpt
    m = finetune(path, layer_decay=0.5, optim={"lr": 1e-3, "warmup_steps": 4, "total_steps": 14, "betas": [0.9, 0.999], "schedule": "cosine"})
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == pytest.approx([1e-3 * s / 4 for s in (0.125, 0.25, 0.5, 1.0)])  # warm-up step 0: 1/4
    for _ in range(4):
        opt.step()
        sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3 * s for s in (0.125, 0.25, 0.5, 1.0)])
    for _ in range(5):
        opt.step()
        sched.step()  # half-way through the cosine: factor 0.5
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([5e-4 * s for s in (0.125, 0.25, 0.5, 1.0)])


# -- loss, mixup -------------------------------------------------------------------------------------
def test_mixup_and_cutmix_give_soft_targets_summing_to_one():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 8, 8)
    labels = torch.arange(16) % 10
    for alphas in [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)]:
        mix = mixup_transform(10, *alphas)
        mixed, soft = mix(images, labels)
        assert soft.shape == (16, 10) and mixed.shape == images.shape
        torch.testing.assert_close(soft.sum(1), torch.ones(16))
        assert (soft >= 0).all() and not torch.equal(mixed, images)
        assert ((soft > 0).sum(1) == 2).all()  # two classes per sample (labels differ from their partners)
    assert mixup_transform(10, 0.0, 0.0) is None
    never = mixup_transform(10, 0.8, 1.0, prob=0.0)
    same, onehot = never(images, labels)
    assert torch.equal(same, images) and torch.equal(onehot, F.one_hot(labels, 10).float())
    with pytest.raises(ValueError, match="mixup"):
        mixup_transform(10, -1.0)


def test_soft_target_loss_is_smoothed_cross_entropy(ckpt):
    _, path = ckpt
    m = finetune(path, label_smoothing=0.1)
    logits = torch.randn(4, 10)
    soft = torch.softmax(torch.randn(4, 10), 1)
    smoothed = soft * 0.9 + 0.1 / 10  # timm Mixup's smoothed targets
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(m.loss(logits, soft), expected)
    hard = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(m.loss(logits, hard), F.cross_entropy(logits, hard, label_smoothing=0.1))


def test_training_step_with_mixup_gives_gradients_to_encoder_and_head(ckpt):
    _, path = ckpt
    m = finetune(path, mixup=0.8, cutmix=1.0)
    loss = m.training_step((torch.rand(8, 3, 8, 8), torch.arange(8) % 10), 0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert m.encoder.token_emb.word_embeddings.weight.grad is not None and m.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.tokenizer.parameters())
    with pytest.raises(ValueError, match="image batches"):
        m.training_step((torch.randint(0, K, (4, 16)), torch.arange(4)), 0)


def test_continuous_input_checkpoint_finetunes_on_unquantized_features(tmp_path):
    pre = pretrain_module(input_mode="continuous")
    path = save_lightning_ckpt(pre, tmp_path / "cont.ckpt")
    m = finetune(path).eval()
    assert m.encoder.input_mode == "continuous" and m.encoder.continuous_proj.in_features == 8
    torch.testing.assert_close(m.encoder.continuous_proj.weight, pre.mage.continuous_proj.weight)
    images = torch.rand(2, 3, 8, 8)
    z = m.tokenizer.encode(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m(images), m.head(m.fc_norm(m.encoder.pool(None, continuous=z))))
    layer0 = [n for g in m.param_groups() if g["layer"] == 0 for n in g["names"]]
    assert "continuous_proj.weight" in layer0 and "continuous_proj.bias" in layer0
    with pytest.raises(ValueError, match="image batches"):
        m(torch.randint(0, K, (2, 16)))


# -- it learns ---------------------------------------------------------------------------------------
def test_a_hundred_steps_on_digits_beat_chance_by_far(tmp_path):
    """100 AdamW steps on the 8x8 digits (4x4 tokens of an untrained tokenizer, random encoder: the
    path itself must learn): val top-1 far above the 10 % chance level (measured 0.54)."""
    torch.manual_seed(0)
    x, y = digits_arrays(8)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(y).long()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]
    path = save_lightning_ckpt(pretrain_module(image_size=8), tmp_path / "digits.ckpt")
    m = finetune(path, image_size=8, layer_decay=0.75, optim={"lr": 4e-3, "warmup_steps": 5, "total_steps": 100, "schedule": "cosine"})
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    g = torch.Generator().manual_seed(1)
    m.train()
    with torch.no_grad():
        before = (m.eval()(images[val]).argmax(1) == labels[val]).float().mean().item()
    m.train()
    for _ in range(100):
        idx = train[torch.randint(0, len(train), (64,), generator=g)]
        loss = m.training_step((images[idx], labels[idx]), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    with torch.no_grad():
        top1 = (m(images[val]).argmax(1) == labels[val]).float().mean().item()
    assert before < 0.2 and top1 >= 0.35, (before, top1)


# -- the real entry point ------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_then_finetune_through_the_train_cli(session_home, tiny_tokenizer):
    """`experiment=digits_mage` writes last.ckpt; `experiment=digits_mage_finetune model.pretrained=...`
    fine-tunes it and logs val/top1; without model.pretrained the run fails naming the key."""
    import json

    from conftest import run_module

    tiny = [
        f"tokenizer.ckpt={tiny_tokenizer}", "logger=csv", "callbacks=none", "trainer.max_steps=4",
        "data.batches_per_epoch=2", "trainer.limit_val_batches=1", "data.val_batches=1",
    ]
    arch = ["model.arch.enc_width=32", "model.arch.enc_depth=2", "model.arch.enc_heads=2",
            "model.arch.dec_width=32", "model.arch.dec_depth=1", "model.arch.dec_heads=2"]
    run_module("lightning_mim.train", ["experiment=digits_mage", "run_name=ft-pre", *tiny, *arch], session_home)
    ckpt = session_home / "runs" / "ft-pre" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    ft = ["experiment=digits_mage_finetune", "logger=csv", "trainer.max_steps=4", "data.batches_per_epoch=2",
          "data.val_batches=1", "trainer.check_val_every_n_epoch=1"]
    run_module("lightning_mim.train", [*ft, "run_name=ft-run", f"model.pretrained={ckpt}"], session_home)
    result = json.loads((session_home / "runs" / "ft-run" / "result.json").read_text())
    assert 0.0 <= result["metrics"]["val/top1"] <= 1.0 and result["global_step"] == 4
    failed = run_module("lightning_mim.train", [*ft, "run_name=ft-missing"], session_home, check=False)
    assert failed.returncode != 0 and "model.pretrained" in failed.stderr


def test_unknown_optim_key_lists_the_valid_ones(ckpt):
    _, path = ckpt
    m = finetune(path, optim={"lr": 1e-3, "warmup": 3})
    with pytest.raises(ValueError, match=r"unknown optim key\(s\) \['warmup'\]; valid: .*warmup_epochs"):
        m.configure_optimizers()


def test_imagenet_finetune_experiment_is_the_official_recipe(tmp_path):
    """LTH14/mage README "Fine-tuning" (ViT-B): 4 x 8 GPUs x 32, blr 2.5e-4, layer decay 0.65, wd 0.05,
    100 epochs with 5 warm-up, label smoothing 0.1, mixup 0.8 / cutmix 1.0, global pool + fc_norm."""
    cfg = compose(["experiment=imagenet256_mage_b_finetune", f"paths.home={tmp_path}", "model.pretrained=x.pth"])
    m, o, t = cfg.model, cfg.model.optim, cfg.trainer
    assert m._target_.endswith("MAGEFinetuneModule") and m.head_norm == "layernorm" and m.init == "pretrained"
    assert (m.layer_decay, m.label_smoothing, m.mixup, m.cutmix, m.mixup_switch_prob) == (0.65, 0.1, 0.8, 1.0, 0.5)
    assert (o.base_lr, o.weight_decay, o.warmup_epochs, list(o.betas), o.schedule) == (2.5e-4, 0.05, 5, [0.9, 0.999], "cosine")
    assert o.min_lr_ratio * o.base_lr * 1024 / 256 == pytest.approx(1e-6)
    assert cfg.data.batch_size * t.devices * t.num_nodes == 1024 and t.max_epochs == 100 and cfg.data.image_size == 256

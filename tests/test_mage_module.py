"""MAGEModule / MAGE-C pinned to docs/FIDELITY.md "MAGE" and "MAGE-C": masks, loss, gradients, generation,
features, the contrastive term, the optimiser recipe, configs."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from lightning_mim.losses import info_nce
from lightning_mim.masking import TruncGaussRatio, num_masked
from lightning_mim.modules.mage import MAGEModule, gathered_info_nce, mage_masks
from _decode import decode_config
from _processes import free_port

warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer

K = 16  # tiny tokenizer codebook
S = 8  # image size; tokenizer f = 2 -> 4x4 grid
N = 16
TOKENIZER = {
    "ckpt": None,
    "arch": {"base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1, "codebook_size": K, "code_dim": 8, "norm_groups": 4},
}
ARCH = {"enc_width": 32, "enc_depth": 2, "enc_heads": 4, "dec_width": 24, "dec_depth": 1, "dec_heads": 2}
TRUNC_GAUSS = {"_target_": "lightning_mim.masking.TruncGaussRatio", "mean": 0.55, "std": 0.25, "low": 0.5, "high": 1.0, "per_sample": False}
OPTIM = {"name": "adamw", "lr": None, "base_lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05,
         "decay_norms_and_biases": False, "warmup_steps": 0, "schedule": "cosine"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a shared, busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixed(value: float) -> dict:
    return {"_target_": "lightning_mim.masking.FixedRatio", "value": value}


def make(seed: int = 0, **kw) -> MAGEModule:
    torch.manual_seed(seed)
    args = dict(arch=ARCH, tokenizer=TOKENIZER, ratio=TRUNC_GAUSS, decode=decode_config(steps=4), optim=OPTIM, image_size=S)
    args.update(kw)
    return MAGEModule(**args)


def make_c(**kw) -> MAGEModule:
    views = {"scale": [0.3, 1.0], "hflip": True}
    return make(contrastive=True, projection={"hidden": 16, "out": 8}, views=views, **kw)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, S, S, generator=gen(seed))


def tokens(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (batch, N), generator=gen(seed))


# -- layout and construction ------------------------------------------------------------------------
def test_unconditional_layout_and_fake_class():
    m = make()
    assert m.num_classes == 0 and m.n_tokens == N
    assert (m.layout.vocab_size, m.layout.mask_id) == (K + 2, K + 1)  # codes, one class slot, mask
    assert m.mage.fake_class_id == K and m.mage.mask_id == K + 1
    assert m.projection is None and m.views is None  # MAGE: no contrastive modules at all
    official = make(class_slots=1000, fake_class_id=K + 76)  # official layout (K + 1000 slots + mask; 1100 at K=1024)
    assert (official.layout.vocab_size, official.layout.mask_id, official.mage.fake_class_id) == (K + 1001, K + 1000, K + 76)
    assert official.num_classes == 0  # still unconditional


@pytest.mark.parametrize("bad, match", [
    (dict(arch={**ARCH, "vocab_size": 99}), "vocab_size"),
    (dict(arch={**ARCH, "input_mode": "continuous", "continuous_dim": 8}), "continuous_dim"),  # derived
    (dict(arch={**ARCH, "input_mode": "pixels"}), "valid: tokens, continuous"),
    (dict(class_slots=0), "class_slots"),
    (dict(fake_class_id=K + 1), "fake_class_id"),  # the mask id is not a class slot
    (dict(contrastive=True, views={"scael": [0.2, 1]}), "valid: scale, ratio, hflip"),
    (dict(contrastive=True, projection={"width": 8}), "valid: hidden, out"),
    (dict(contrastive=True, contrastive_temperature=0.0), "contrastive_temperature"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        make(**bad)


# -- masks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio, n_mask, n_drop", [(0.7, 12, 8), (0.5, 8, 8), (1.0, 16, 8), (0.55, 9, 8)])
def test_mask_count_is_ceil_ratio_n_and_drop_is_half(ratio, n_mask, n_drop):
    m = make(ratio=fixed(ratio))
    mask, drop = m.sample_masks(64, gen(1))
    assert (mask.sum(1) == n_mask).all()  # ceil(ratio·16)
    assert (drop.sum(1) == n_drop).all()  # ceil(0.5·16)
    assert not (drop & ~mask).any()  # dropped ⊆ masked
    if n_mask < N:
        assert len({tuple(r.tolist()) for r in mask}) > 1  # positions differ per sample


def test_trunc_gauss_one_ratio_per_step():
    m = make()
    for seed in range(5):
        mask, drop = m.sample_masks(8, gen(seed))
        ratio = TruncGaussRatio()(8, gen(seed))  # the same draw: the sampler consumes the generator first
        assert (mask.sum(1) == num_masked(ratio, N)).all()
        assert mask.sum(1).unique().numel() == 1  # one ratio for the whole batch
        assert 8 <= int(mask.sum(1)[0]) <= 16  # ratio in [0.5, 1]
        assert (drop.sum(1) == 8).all() and not (drop & ~mask).any()


def test_drop_is_clamped_to_the_masked_count():
    m = make(ratio=fixed(0.3))  # ceil(0.3·16) = 5 masked < ceil(0.5·16) = 8 to drop
    mask, drop = m.sample_masks(16, gen(0))
    assert (mask.sum(1) == 5).all() and torch.equal(drop, mask)
    ratio = torch.tensor([0.25, 0.9, 0.6])  # per-sample ratios: the drop count is the batch's smallest mask
    mask, drop = mage_masks(ratio, N, 0.5, gen(0))
    assert mask.sum(1).tolist() == [4, 15, 10] and drop.sum(1).tolist() == [4, 4, 4]
    assert not (drop & ~mask).any()


def test_encoder_sees_class_slot_plus_undropped_tokens():
    m = make(ratio=fixed(0.75))
    seen = []
    m.mage.blocks[0].register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[1]))
    m.reconstruction(tokens(), gen(0))
    assert seen == [1 + N - 8]


# -- loss --------------------------------------------------------------------------------------------
def test_loss_is_label_smoothed_ce_on_masked_positions_only():
    m = make(ratio=fixed(0.6)).eval()  # no dropout: logits are reproducible
    tok = tokens(3)
    out = m.reconstruction(tok, gen(7))
    mask, drop = m.sample_masks(3, gen(7))  # the same masks
    assert torch.equal(mask, out["mask"]) and torch.equal(drop, out["drop"])
    logits = m.mage(tok, mask, drop)
    assert logits.shape == (3, N, K)  # codebook logits only
    expected = F.cross_entropy(logits[mask], tok[mask], label_smoothing=0.1)  # mean over all masked tokens
    torch.testing.assert_close(out["loss"], expected)
    everywhere = F.cross_entropy(logits.flatten(0, 1), tok.flatten(), label_smoothing=0.1)
    assert not torch.isclose(out["loss"], everywhere)
    no_smoothing = F.cross_entropy(logits[mask], tok[mask])
    assert not torch.isclose(out["loss"], no_smoothing)


def test_token_mean_weights_every_masked_token_equally():
    m = make(ratio={"_target_": "lightning_mim.masking.UniformRatio", "low": 0.3, "high": 1.0, "per_sample": True}).eval()
    tok = tokens(4)
    out = m.reconstruction(tok, gen(3))
    mask, drop = out["mask"], out["drop"]
    assert mask.sum(1).unique().numel() > 1  # unequal counts: token_mean != per-sample mean
    per_token = F.cross_entropy(m.mage(tok, mask, drop).transpose(1, 2), tok, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(out["loss"], per_token[mask].mean())
    per_sample = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert not torch.isclose(out["loss"], per_sample)


# -- training steps and gradients ------------------------------------------------------------------------
def assert_every_trainable_param_has_grad(m: MAGEModule) -> None:
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("tokenizer.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in m.tokenizer.parameters())


@pytest.mark.parametrize("kind", ["tokens", "images"])
def test_training_step_gives_every_trainable_parameter_a_gradient(kind):
    m = make().train()
    batch = (tokens(4) if kind == "tokens" else images(4), torch.zeros(4, dtype=torch.long))
    loss = m.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert_every_trainable_param_has_grad(m)


def test_images_are_tokenized_by_the_frozen_tokenizer():
    m = make(ratio=fixed(0.5)).eval()
    img = images(2)
    tok = m.tokenizer.encode_to_indices(img).flatten(1)
    a = m.reconstruction(m.to_tokens((img, torch.zeros(2)))[0], gen(0))["loss"]
    b = m.reconstruction(tok, gen(0))["loss"]
    torch.testing.assert_close(a, b)


def test_validation_loss_is_deterministic():
    m = make()
    logged = {}
    m.log = lambda name, value, **kw: logged.setdefault(name, []).append(float(value))
    m.eval()
    m.validation_step((tokens(4), torch.zeros(4)), 0)
    m.validation_step((tokens(4), torch.zeros(4)), 0)
    assert len(logged["val/loss"]) == 2 and logged["val/loss"][0] == logged["val/loss"][1]


def test_a_few_dozen_steps_lower_the_loss():
    """Structured tokens (each row one random code repeated): any visible token gives the masked ones."""
    m = make(seed=0, arch={**ARCH, "dropout": 0.0}).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)

    def batch(seed: int) -> torch.Tensor:
        return torch.randint(0, K, (32, 1), generator=gen(seed)).expand(32, N).clone()

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(float(m.reconstruction(batch(1000 + i), gen(i))["loss"]) for i in range(3)) / 3

    before = eval_loss()
    for step in range(40):
        loss = m.reconstruction(batch(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before > 0.95 * math.log(K)  # starts at chance
    assert after < 0.8 * before, (before, after)


# -- generation and features ----------------------------------------------------------------------------
def test_generate_images_in_unit_range_and_reproducible():
    m = make()
    out = m.generate(None, 3, generator=gen(5))
    assert out.shape == (3, 3, S, S) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, m.generate(None, 3, generator=gen(5)))
    assert m.training  # generate restores the mode
    toks = m.generate_tokens(None, 3, gen(5))
    assert toks.shape == (3, N) and int(toks.max()) < K  # codes only: no class or mask id
    with pytest.raises(ValueError, match="unconditional"):
        m.generate(torch.tensor([0, 1]))


def test_decode_defaults_are_mages_and_config_overrides_them():
    mage = decode_config("mage")  # conf/decode/mage.yaml: the one source of MAGE's generation defaults
    assert mage["steps"] == 20 and mage["choice_temperature"] == 6.0
    assert mage["schedule"] == "cosine"
    m = make(decode=mage)
    _, steps = m.generate(None, 2, generator=gen(0), return_steps=True)
    assert len(steps) == 20
    with pytest.raises(ValueError, match="lack"):
        make(decode={})  # no defaults in code: an incomplete decode section is an error
    m = make(decode=decode_config("mage", steps=3, choice_temperature=4.5))
    assert m.decode_settings.choice_temperature == 4.5
    _, steps = m.generate(None, 2, generator=gen(0), return_steps=True)
    assert len(steps) == 3
    _, steps = m.generate(None, 2, generator=gen(0), return_steps=True, steps=5)
    assert len(steps) == 5


def test_generation_uses_the_full_encoder_without_drop():
    m = make(decode=decode_config(steps=2))
    seen = []
    m.mage.blocks[0].register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[1]))
    m.generate(None, 2, generator=gen(0))
    assert seen == [1 + N, 1 + N]


def test_encode_features_shape_and_definition():
    m = make().train()
    img = images(5)
    feats = m.encode_features(img)
    assert feats.shape == (5, ARCH["enc_width"])
    torch.testing.assert_close(feats, m.encode_features(img))  # eval mode inside: no dropout noise
    assert m.training
    tok = m.tokenizer.encode_to_indices(img).flatten(1)
    m.eval()
    torch.testing.assert_close(feats, m.mage.encode_features(tok))
    torch.testing.assert_close(feats.mean(1), torch.zeros(5), atol=1e-5, rtol=0)  # LayerNorm-ed
    assert m.encode_features(img, layer=1).shape == (5, ARCH["enc_width"])


# -- MAGE-C ------------------------------------------------------------------------------------------------
def test_views_differ_and_stay_images():
    m = make_c()
    img = images(6)
    torch.manual_seed(0)
    v1, v2 = m.make_views(img), m.make_views(img)
    assert v1.shape == v2.shape == (6, 3, S, S)
    assert v1.min() >= 0 and v1.max() <= 1
    assert not torch.allclose(v1, v2)
    assert all(not torch.allclose(a, b) for a, b in zip(v1, v2))  # per sample, not one crop per batch


def test_contrastive_loss_is_rec_plus_lambda_con():
    m = make_c(contrastive_weight=0.1).eval()
    img = images(4)
    torch.manual_seed(3)
    out = m.contrastive_step(img)
    torch.manual_seed(3)  # replay the same views and masks, calling the parts
    views = torch.cat([m.make_views(img), m.make_views(img)])
    tok, _ = m.to_tokens((views, torch.zeros(8)))
    rec = m.reconstruction(tok)
    z1, z2 = m.project(rec["encoder_output"]).chunk(2)
    con = info_nce(z1, z2, temperature=0.2)
    torch.testing.assert_close(out["loss_rec"], rec["loss"])
    torch.testing.assert_close(out["loss_con"], con)
    torch.testing.assert_close(out["loss"], rec["loss"] + 0.1 * con)
    assert con > 0.1  # the check above is not vacuous
    pooled = rec["encoder_output"][:, 1:].mean(1)  # global average of the kept image tokens
    torch.testing.assert_close(m.project(rec["encoder_output"]), m.projection(pooled))


def test_contrastive_training_step_logs_parts_and_reaches_every_parameter():
    m = make_c().train()
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    loss = m.training_step((images(4), torch.zeros(4, dtype=torch.long)), 0)
    assert set(logged) >= {"train/loss", "train/loss_rec", "train/loss_con"}
    torch.testing.assert_close(loss, logged["train/loss_rec"] + 0.1 * logged["train/loss_con"])
    loss.backward()
    assert_every_trainable_param_has_grad(m)
    assert m.projection.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image batches"):
        m.training_step((tokens(4), torch.zeros(4)), 0)


def test_gathered_info_nce_on_one_process_equals_ungathered():
    m = make_c()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    m.trainer = trainer
    z1, z2 = torch.randn(6, 8, generator=gen(0)), torch.randn(6, 8, generator=gen(1))
    torch.testing.assert_close(m.contrastive_loss(z1, z2), info_nce(z1, z2, temperature=0.2))
    assert m.contrastive_loss(z1, z2) != info_nce(z1, z2, temperature=0.5)


def test_gather_flattens_ranks_in_order():
    """Under DDP Lightning's all_gather returns (W, B, D): the module flattens it rank-major."""
    m = make_c()
    calls = []

    def fake_all_gather(z, sync_grads=False):
        calls.append(sync_grads)
        return torch.stack([z, z + 100])

    m.all_gather = fake_all_gather
    m._trainer = object()
    z = torch.randn(3, 4)
    out = m._gather(z)
    assert calls == [True]  # gradients flow back through the gather
    torch.testing.assert_close(out, torch.cat([z, z + 100]))


def _two_rank_worker(rank: int, port: int, x: torch.Tensor, w: torch.Tensor, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from torch.distributed.nn.functional import all_gather

        def gather(t: torch.Tensor) -> torch.Tensor:  # what LightningModule.all_gather(sync_grads=True) does
            return torch.stack(all_gather(t.contiguous())).flatten(0, 1)

        weight = w.clone().requires_grad_(True)
        local = x[:, rank * 3 : (rank + 1) * 3]  # (2 views, 3 images of this rank, D)
        loss = gathered_info_nce(local[0] @ weight, local[1] @ weight, 0.2, gather)
        loss.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # DDP: average the parameter gradients over ranks
        queue.put((rank, float(loss), (grad / 2).tolist()))  # plain lists: a tensor's shared memory dies with the worker
    finally:
        dist.destroy_process_group()


def test_two_rank_gathered_info_nce_matches_the_single_process_loss_and_gradient():
    x = torch.randn(2, 6, 5, generator=gen(0))  # two views of 6 images, split 3 + 3 over 2 ranks
    w = torch.randn(5, 4, generator=gen(1))
    weight = w.clone().requires_grad_(True)
    full = info_nce(x[0] @ weight, x[1] @ weight, temperature=0.2)
    full.backward()
    full = full.detach()
    ctx = mp.get_context("fork")  # no re-import of torch and lightning in the workers
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, x, w, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, loss, grad in results:
        assert math.isclose(loss, float(full), rel_tol=1e-5)
        torch.testing.assert_close(torch.tensor(grad), weight.grad)
    local_only = info_nce(x[0, :3] @ w, x[1, :3] @ w, temperature=0.2)
    assert not math.isclose(float(local_only), float(full), rel_tol=1e-3)  # gathering matters


# -- optimiser --------------------------------------------------------------------------------------------
def fit_briefly(m: MAGEModule, *, batch_size: int = 8, accumulate: int = 2, batches: int = 4) -> pl.Trainer:
    data = TensorDataset(torch.randint(0, K, (batch_size * batches, N)), torch.zeros(batch_size * batches, dtype=torch.long))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(m, DataLoader(data, batch_size=batch_size))
    return trainer


def test_optimizer_is_mages_adamw_with_base_lr_scaled_by_global_batch():
    trainer = fit_briefly(make(optim={**OPTIM, "warmup_epochs": 1.5}))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["initial_lr"] == pytest.approx(1.5e-4 * 16 / 256)  # base_lr · (8 per batch × 2 accumulated) / 256
    assert decay["betas"] == (0.9, 0.95)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    model = trainer.lightning_module
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable  # no tokenizer parameter
    # warmup_epochs 1.5 × (4 batches / 2 accumulated = 2 steps per epoch) = 3 warm-up steps
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.lr_lambdas[0](0) == pytest.approx(1 / 3)
    assert scheduler.lr_lambdas[0](2) == pytest.approx(1.0)


def test_explicit_lr_or_global_batch_wins():
    trainer = fit_briefly(make(optim={**OPTIM, "global_batch": 4096}))
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1.5e-4 * 16)
    trainer = fit_briefly(make(optim={**OPTIM, "lr": 1e-3}))
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup_epochs or warmup_steps"):
        fit_briefly(make(optim={**OPTIM, "warmup_steps": 5, "warmup_epochs": 1}))


def test_checkpoint_rebuilds_the_module(tmp_path):
    m = make(ratio=fixed(0.6), class_slots=3)
    trainer = fit_briefly(m)
    path = tmp_path / "mage.ckpt"
    trainer.save_checkpoint(path)
    loaded = MAGEModule.load_from_checkpoint(path, weights_only=True)  # self-describing: no arguments needed
    assert loaded.layout == m.layout and loaded.ratio_sampler == m.ratio_sampler
    torch.testing.assert_close(loaded.state_dict(), m.state_dict())
    torch.testing.assert_close(loaded.generate(None, 2, generator=gen(0)), m.generate(None, 2, generator=gen(0)))


def test_mage_c_contrastive_head_is_optimised():
    m = make_c()
    data = TensorDataset(torch.rand(8, 3, S, S), torch.zeros(8, dtype=torch.long))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    before = m.projection.fc1.weight.detach().clone()
    trainer.fit(m, DataLoader(data, batch_size=4))
    params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(m.projection.fc1.weight) in params
    assert not torch.equal(before, m.projection.fc1.weight)
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1.5e-4 * 4 / 256)  # images, not views


# -- configs --------------------------------------------------------------------------------------------
CONF = Path(__file__).resolve().parent.parent / "conf"
NEEDED = {"tokenizer/tiny.yaml": "ckpt: null\narch: {}\n", "tokenizer/maskgit_f16.yaml": "ckpt: null\narch: {}\n",
          "callbacks/default.yaml": "{}\n"}


@pytest.fixture
def compose(tmp_path, monkeypatch):
    """`config.compose` on conf/; groups other helpers have not written yet get empty stand-ins."""
    from lightning_mim.orchestration.config import compose

    missing = [name for name in NEEDED if not (CONF / name).is_file()]
    if missing:
        shutil.copytree(CONF, tmp_path / "conf")
        for name in missing:
            (tmp_path / "conf" / name).parent.mkdir(exist_ok=True)
            (tmp_path / "conf" / name).write_text(NEEDED[name])
        monkeypatch.setenv("LIGHTNING_MIM_CONF", str(tmp_path / "conf"))
    return compose


def build_from(cfg) -> MAGEModule:
    """The composed model config, with the tiny test tokenizer and image size."""
    torch.manual_seed(0)
    return instantiate(cfg.model, tokenizer=TOKENIZER, image_size=S, _recursive_=False, _convert_="all")


def test_digits_experiments_compose_with_mages_defaults(compose):
    cfg = compose(["experiment=digits_mage"])
    assert cfg.model._target_ == "lightning_mim.modules.mage.MAGEModule"
    assert cfg.model.ratio._target_.endswith("TruncGaussRatio") and cfg.model.ratio.per_sample is False
    assert (cfg.model.decode.steps, cfg.model.decode.choice_temperature) == (20, 6.0)
    assert cfg.model.decode.schedule == "cosine"
    assert cfg.model.contrastive is False and cfg.model.image_size == cfg.data.image_size
    assert cfg.trainer.gradient_clip_val == 3.0
    assert (cfg.model.optim.name, cfg.model.optim.lr, list(cfg.model.optim.betas)) == ("adamw", None, [0.9, 0.95])
    assert cfg.choices["callbacks"] == "mage" and "linear_probe" in cfg.callbacks
    m = build_from(cfg)
    assert isinstance(m.ratio_sampler, TruncGaussRatio) and m.projection is None
    assert (m.decode_settings.steps, m.decode_settings.choice_temperature) == (20, 6.0)
    assert m.mage.norm.normalized_shape == (cfg.model.arch.enc_width,)

    c = compose(["experiment=digits_mage_c"])
    assert c.model.contrastive is True and c.model.contrastive_weight == 0.1 and c.model.contrastive_temperature == 0.2
    assert c.model.ratio._target_.endswith("TruncGaussRatio") and c.trainer.gradient_clip_val == 3.0
    assert c.data.train_augment.random_resized_crop is False  # the module makes the views
    m = build_from(c)
    assert m.projection.fc2.out_features == c.model.projection.out and m.views is not None


def test_model_configs_work_without_an_experiment(compose):
    cfg = compose(["model=mage", "ratio=trunc_gauss"])
    assert cfg.model.arch.enc_width == 768 and cfg.model.optim.base_lr == 1.5e-4
    c = compose(["model=mage_c", "ratio=fixed", "ratio.value=0.3"])  # the clamped-drop ablation composes too
    assert c.model.contrastive is True and c.model.projection.hidden == 2048 and c.model.projection.out == 256
    assert list(c.model.views.scale) == [0.2, 1.0] and c.model.views.hflip is True
    assert c.model.ratio.value == 0.3


@pytest.mark.parametrize("name, size", [
    ("imagenet256_mage_b", (768, 12, 12, 768, 8, 16)),
    ("imagenet256_mage_l", (1024, 24, 16, 1024, 8, 16)),
])
def test_imagenet_experiments_are_the_papers_settings(compose, name, size):
    cfg = compose([f"experiment={name}"])
    a = cfg.model.arch
    assert (a.enc_width, a.enc_depth, a.enc_heads, a.dec_width, a.dec_depth, a.dec_heads) == size
    assert (a.mlp_ratio, a.dropout) == (4.0, 0.1)
    assert (cfg.model.class_slots, cfg.model.fake_class_id, cfg.model.drop_ratio) == (1000, 1100, 0.5)
    o = cfg.model.optim
    assert (o.name, o.base_lr, list(o.betas), o.weight_decay, o.decay_norms_and_biases) == ("adamw", 1.5e-4, [0.9, 0.95], 0.05, False)
    assert (o.warmup_epochs, o.schedule, o.lr, o.min_lr_ratio) == (40, "cosine", None, 0.0)
    t = cfg.trainer
    assert (t.max_epochs, t.max_steps, t.gradient_clip_val, t.precision, t.strategy) == (1600, -1, 3.0, "bf16-mixed", "ddp")
    assert cfg.data.batch_size * t.devices * t.num_nodes * t.accumulate_grad_batches == 4096
    aug = cfg.data.train_augment
    assert aug.random_resized_crop and list(aug.scale) == [0.2, 1.0] and aug.hflip
    assert cfg.data.image_size == 256 and cfg.choices["tokenizer"] == "maskgit_f16" and cfg.choices["data"] == "imagenet_wds"
    r = cfg.model.ratio
    assert r._target_.endswith("TruncGaussRatio") and (r.mean, r.std, r.low, r.high, r.per_sample) == (0.55, 0.25, 0.5, 1.0, False)
    assert (cfg.model.decode.steps, cfg.model.decode.choice_temperature, cfg.model.decode.schedule) == (20, 6.0, "cosine")
    assert cfg.model.loss_reduction == "token_mean" and cfg.model.label_smoothing == 0.1
    assert cfg.evaluation.num_samples == 50000 and list(cfg.evaluation.extractor) == ["inception"]
    assert "linear_probe" in cfg.callbacks


# -- input_mode=continuous (the tokens-vs-continuous ablation, paper Table 6) --------------------------
def test_continuous_input_feeds_unquantized_features_and_keeps_token_targets():
    m = make(arch={**ARCH, "input_mode": "continuous"}, ratio=fixed(0.5)).eval()  # no dropout
    assert m.continuous_input and m.mage.continuous_proj.in_features == m.tokenizer.code_dim == 8
    x = images(4)
    tokens, cont = m.model_inputs(x, m.continuous_input)
    z = m.tokenizer.encode(x)  # (B, D, h, w) before quantisation
    torch.testing.assert_close(cont, z.flatten(2).transpose(1, 2))
    assert torch.equal(tokens, m.tokenizer.encode_to_indices(x).flatten(1))  # the target: the codes
    # the loss is the token loss of the model run on the continuous features
    out = m.reconstruction(tokens, gen(3), cont)
    mask, drop = m.sample_masks(4, gen(3))
    logits = m.mage(None, mask, drop, cont)
    expected = F.cross_entropy(logits[mask], tokens[mask], label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], expected)
    # visible features matter, masked ones do not (they are replaced by the mask embedding)
    bumped = cont.clone()
    bumped[mask] += 5.0
    torch.testing.assert_close(m.mage(None, mask, drop, bumped), m.mage(None, mask, drop, cont), rtol=0, atol=0)
    bumped = cont.clone()
    bumped[~mask] += 5.0
    assert not torch.allclose(m.mage(None, mask, drop, bumped), m.mage(None, mask, drop, cont))


def test_continuous_input_trains_and_gives_features_but_needs_images():
    m = make(arch={**ARCH, "input_mode": "continuous"})
    loss = m.training_step((images(4), torch.zeros(4, dtype=torch.long)), 0)
    loss.backward()
    assert math.isfinite(loss.item()) and m.mage.continuous_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.tokenizer.parameters())
    assert m.encode_features(images(3)).shape == (3, ARCH["enc_width"])
    with pytest.raises(ValueError, match="image batches"):
        m.training_step((tokens(4), torch.zeros(4, dtype=torch.long)), 0)
    with pytest.raises(NotImplementedError, match="input_mode='tokens'"):
        m.generate(num_samples=2)
    c = make_c(arch={**ARCH, "input_mode": "continuous"})  # MAGE-C views go through the same path
    assert math.isfinite(c.training_step((images(4), torch.zeros(4, dtype=torch.long)), 0).item())


def test_generation_callbacks_skip_a_continuous_input_mage_with_a_warning(tmp_path):
    """The default MAGE callback set must not crash an input_mode=continuous run: FID etc. are
    skipped with the reason, pictures fall back to the tokenizer's reconstructions."""
    from types import SimpleNamespace

    from lightning_mim.callbacks import GenerationMetrics, Pictures

    m = make(arch={**ARCH, "input_mode": "continuous"})
    metrics = GenerationMetrics(extractors=["domain"], cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="inactive: MAGE with arch.input_mode='continuous' cannot generate"):
        metrics.setup(None, m, "fit")
    assert not metrics.active
    pictures = Pictures(out_dir=tmp_path)
    with pytest.warns(UserWarning, match="draws no samples.*drawing \\['reconstructions'\\]"):
        pictures.setup(SimpleNamespace(default_root_dir=tmp_path), m, "fit")
    assert pictures.active == ["reconstructions"]
    tokens_mage = make()  # the official token input still generates: both callbacks active
    pictures.setup(SimpleNamespace(default_root_dir=tmp_path), tokens_mage, "fit")
    assert pictures.active == ["uncond_grid", "progression", "reconstructions"]

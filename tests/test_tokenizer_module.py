"""TokenizerModule: losses, GAN pieces, step counting, logging, checkpoints (tiny CPU configurations)."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mim.modules.tokenizer import TokenizerModule
from lightning_mim.nn.discriminator import (
    PatchDiscriminator,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)

ARCH = dict(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=16, code_dim=4, norm_groups=4)
DISC = dict(base_channels=8, num_layers=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _loader(n: int = 8, size: int = 16, batch: int = 4):
    data = torch.utils.data.TensorDataset(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)),
                                          torch.zeros(n, dtype=torch.long))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _trainer(quiet_trainer, max_steps: int, **kw) -> pl.Trainer:
    return quiet_trainer(max_steps=max_steps, num_sanity_val_steps=0, **kw)


class _Recorder(pl.loggers.logger.Logger):
    """A logger that keeps what it is given (metrics per step and params)."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []
        self.params: dict = {}

    name = "rec"
    version = "0"

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(dict(params))

    def log_metrics(self, metrics, step=None):
        self.metrics.append({**metrics, "_step": step})


# -- pure loss pieces ---------------------------------------------------------------------------


def test_gan_losses_values():
    zero = torch.zeros(4)
    assert discriminator_loss(zero, zero, "hinge").item() == pytest.approx(2.0)
    assert discriminator_loss(zero, zero, "non_saturating").item() == pytest.approx(2 * math.log(2))
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(
        (math.log1p(math.exp(2.0)) + math.log(2)) / 2
    )
    with pytest.raises(ValueError, match="valid: non_saturating, hinge"):
        generator_loss(fake, "wgan")


def test_r1_penalty_of_a_linear_critic_is_its_squared_weight_norm():
    critic = nn.Conv2d(3, 1, kernel_size=2, bias=True)  # d sum(D(x)) / dx is a fixed map of the weights
    x = torch.rand(2, 3, 2, 2)
    penalty, logits = r1_penalty(critic, x)
    assert logits.shape == (2, 1, 1, 1)
    assert penalty.item() == pytest.approx(critic.weight.pow(2).sum().item(), rel=1e-6)
    penalty.backward()  # create_graph: the penalty trains the critic
    torch.testing.assert_close(critic.weight.grad, 2 * critic.weight.detach())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    nll = (w * torch.tensor([1.0, 0.0])).sum() * 6.0  # grad (6, 0): norm 6
    g = (w * w).sum() / 2.0  # grad w = (3, 4): norm 5
    lam = adaptive_generator_weight(nll, g, w)
    assert lam.item() == pytest.approx(6.0 / (5.0 + 1e-4))
    assert not lam.requires_grad


def test_patch_discriminator_shapes_and_options():
    d = PatchDiscriminator(base_channels=8, num_layers=2)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(base_channels=8, num_layers=3)(torch.rand(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        PatchDiscriminator(norm="layer")


# -- the module ---------------------------------------------------------------------------------


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss option\(s\) \['gan_wieght'\]; valid: .*'gan_weight'"):
        TokenizerModule(vqgan=ARCH, loss={"gan_wieght": 0.1})
    with pytest.raises(ValueError, match="valid: l1, l2"):
        TokenizerModule(vqgan=ARCH, loss={"reconstruction": "huber", "perceptual_weight": 0})
    with pytest.raises(ValueError, match=r"unknown optim option\(s\) \['momentum'\]"):
        TokenizerModule(vqgan=ARCH, optim={"momentum": 0.9})


def test_training_with_gan_counts_generator_steps_and_logs_everything(tmp_path, quiet_trainer):
    torch.manual_seed(0)
    module = TokenizerModule(
        vqgan=ARCH,
        loss={"perceptual_weight": 0.0, "gan_weight": 0.1, "disc_start": 2, "r1_weight": 10.0, "entropy_weight": 0.1,
              "discriminator": DISC},
        optim={"lr": 1e-3},
    )
    d_before = [p.detach().clone() for p in module.discriminator.parameters()]
    logger = _Recorder()
    trainer = _trainer(quiet_trainer, max_steps=4, logger=logger, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(module, _loader(n=16))
    # 4 generator updates = 4 batches, although the discriminator also stepped twice (steps 2 and 3)
    assert trainer.global_step == 4
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert any(not torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters()))
    logged = {k for row in logger.metrics for k in row}
    for key in ("train/rec_loss", "train/vq_loss", "train/entropy_loss", "train/g_loss", "train/gan_weight", "train/d_loss",
                "train/r1", "train/perplexity", "train/codebook_usage", "train/psnr"):
        assert key in logged, key
    d_rows = [row for row in logger.metrics if "train/d_loss" in row]
    assert [row["_step"] for row in d_rows] == [2, 3]  # GAN only from disc_start on
    assert logger.params["tokenizer/perceptual_loss"] == "off"


def test_validation_metrics_and_reconstruct(tmp_path, quiet_trainer):
    torch.manual_seed(0)
    module = TokenizerModule(vqgan=ARCH, loss={"perceptual_weight": 0.0, "gan_weight": 0.0}, optim={"lr": 1e-3})
    assert module.discriminator is None
    trainer = _trainer(quiet_trainer, max_steps=2)
    trainer.fit(module, _loader(), _loader())
    metrics = trainer.callback_metrics
    for key in ("val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity", "val/rec_loss"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 < metrics["val/codebook_usage"].item() <= 1.0
    assert 1.0 <= metrics["val/perplexity"].item() <= 16.0
    # usage over the whole validation set = distinct codes / K
    module.eval()
    images = torch.cat([x for x, _ in _loader()])
    codes = module.vqgan.encode_to_indices(images)
    assert metrics["val/codebook_usage"].item() == pytest.approx(codes.unique().numel() / 16)
    recon = module.reconstruct(images[:2])
    assert recon.shape == (2, 3, 16, 16) and recon.min() >= 0 and recon.max() <= 1


def test_missing_perceptual_weights_warn_once_log_a_param_and_disable_the_loss(tmp_path, quiet_trainer):
    with pytest.warns(UserWarning, match="perceptual loss .* disabled: VGG16 weights not found at .*nope.pth"):
        module = TokenizerModule(vqgan=ARCH, loss={"perceptual_weight": 0.1, "perceptual_weights_path": str(tmp_path / "nope.pth"),
                                                   "gan_weight": 0.0})
    assert module.perceptual is None
    logger = _Recorder()
    trainer = _trainer(quiet_trainer, max_steps=1, logger=logger, limit_val_batches=0, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no second warning during fit
        warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|num_workers|log_every_n_steps).*")
        trainer.fit(module, _loader())
    assert logger.params["tokenizer/perceptual_loss"].startswith("disabled: VGG16 weights not found")
    assert not any("train/perceptual_loss" in row for row in logger.metrics)


def test_perceptual_loss_runs_with_local_vgg_weights(tmp_path, quiet_trainer):
    import torchvision

    path = tmp_path / "vgg16.pth"
    features = torchvision.models.vgg16(weights=None).features  # the classifier is not needed (and 0.5 GB)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    module = TokenizerModule(vqgan=ARCH, loss={"perceptual_weight": 0.1, "perceptual_weights_path": str(path), "gan_weight": 0.0})
    assert module.perceptual is not None and module.perceptual_status.startswith("on")
    assert not any(k.startswith("perceptual") for k in module.state_dict())  # frozen LPIPS stays out of checkpoints
    logger = _Recorder()
    trainer = _trainer(quiet_trainer, max_steps=1, logger=logger, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, _loader(n=4))
    rows = [row for row in logger.metrics if "train/perceptual_loss" in row]
    assert rows and rows[0]["train/perceptual_loss"] > 0


def test_checkpoint_rebuilds_the_module(tmp_path, quiet_trainer):
    torch.manual_seed(0)
    module = TokenizerModule(vqgan={**ARCH, "quantizer": {"ema": True, "decay": 0.9}},
                             loss={"perceptual_weight": 0.0, "gan_weight": 0.1, "discriminator": DISC, "gan_loss": "hinge"})
    trainer = _trainer(quiet_trainer, max_steps=2, limit_val_batches=0)
    trainer.fit(module, _loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = TokenizerModule.load_from_checkpoint(path, weights_only=True)
    assert again.loss_cfg == module.loss_cfg and again.hparams.vqgan == module.hparams.vqgan
    x = torch.rand(2, 3, 16, 16)
    module.eval(), again.eval()
    assert torch.equal(again.vqgan.encode_to_indices(x), module.vqgan.encode_to_indices(x))
    torch.testing.assert_close(again.vqgan.quantize.cluster_size, module.vqgan.quantize.cluster_size)


def test_reconstruction_grid_goes_to_mlflow(tmp_path, quiet_trainer):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="tok", tracking_uri=uri, artifact_location=str(tmp_path / "art"), run_name="r")
    module = TokenizerModule(vqgan=ARCH, loss={"perceptual_weight": 0.0, "gan_weight": 0.0}, num_logged_images=3)
    trainer = _trainer(quiet_trainer, max_steps=2, logger=logger)  # one epoch: validation runs at its end
    trainer.fit(module, _loader(), _loader())
    client = MlflowClient(tracking_uri=uri)
    paths = []
    stack = [""]
    while stack:
        for info in client.list_artifacts(logger.run_id, stack.pop() or None):
            (stack if info.is_dir else paths).append(info.path)
    assert any("reconstructions" in p for p in paths), paths


def test_vgg_weights_in_the_wrong_format_are_rejected(tmp_path):
    from lightning_mim.nn.perceptual import LPIPS

    path = tmp_path / "notvgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"not a torchvision vgg16 state dict: features.0.weight: shape \(1,\) != expected \(64, 3, 3, 3\); missing features.0.bias"):
        LPIPS(path)

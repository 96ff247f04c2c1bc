"""A small CNN classifier trained on the dataset itself: the feature extractor for small domains.

ImageNet's Inception says little about 32x32 digits, so on small datasets FID / IS / KID /
precision-recall use this classifier instead: its penultimate features (FID, KID, P&R) and its softmax
(IS, and CAS: how often a class-conditional sample is classified as the class it was asked for, the
"classification accuracy score" MaskGIT reports). It is trained once per dataset fingerprint and
cached on disk, with its val accuracy stored beside the weights so a bad classifier is visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.eval.distributed import rank_zero_first
from lightning_mim.eval.images import to_uint8
from lightning_mim.eval.loaders import split_loader

log = logging.getLogger(__name__)

#: Training options and their defaults (the config may override any of them).
#: Digits at 32x32: 97.5-98.6 % val accuracy in ~3 s on one CPU thread.
DEFAULT_TRAINING: dict[str, Any] = dict(
    width=16,  # channels of the first stage; 2x and 4x in the next two
    feature_dim=64,  # penultimate width = the dimension FID is computed in
    epochs=12,
    batch_size=64,
    lr=3e-3,
    weight_decay=5e-4,
    shift=1,  # random translation (pixels) as augmentation; 0 = none (no flips: they change digits)
    seed=0,
    max_train_images=50_000,  # the classifier is trained from memory
)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainClassifier(nn.Module):
    """Images (B,3,H,W) in [0,1] -> logits; `features` gives the penultimate (B, feature_dim)."""

    def __init__(self, num_classes: int, *, width: int = 16, feature_dim: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a domain classifier needs >= 2 classes, got {num_classes}")
        w = width
        self.body = nn.Sequential(
            _conv(in_channels, w, stride=2),
            _conv(w, 2 * w, stride=2),
            _conv(2 * w, 4 * w, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def features(self, images: Tensor) -> Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def _random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to `shift` pixels (replicate padding, then a random crop)."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator).tolist()
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on float images in [0, 1] (evaluated in eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(images))


def train_domain_classifier(
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    **options: Any,
) -> tuple[DomainClassifier, float]:
    """Train a `DomainClassifier` on in-memory float images in [0, 1]; returns (model in eval mode, val acc).

    `options` are the keys of `DEFAULT_TRAINING`. Deterministic for a given seed on CPU; the global RNG
    is left untouched.
    """
    unknown = set(options) - set(DEFAULT_TRAINING)
    if unknown:
        raise ValueError(f"unknown domain-classifier options {sorted(unknown)}; valid: {sorted(DEFAULT_TRAINING)}")
    # may be called from inside Lightning's inference_mode (e.g. a callback at validation end)
    with torch.inference_mode(False), torch.enable_grad():
        return _train(
            train_images.clone(),
            train_labels.clone(),
            val_images.clone(),
            val_labels.clone(),
            num_classes=num_classes,
            device=device,
            opt={**DEFAULT_TRAINING, **options},
        )


def _train(
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    device: str | torch.device,
    opt: dict[str, Any],
) -> tuple[DomainClassifier, float]:
    gen = torch.Generator().manual_seed(int(opt["seed"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(opt["seed"]))
        model = DomainClassifier(num_classes, width=opt["width"], feature_dim=opt["feature_dim"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
    n, bs = len(train_images), int(opt["batch_size"])
    steps = int(opt["epochs"]) * ((n + bs - 1) // bs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opt["lr"], total_steps=max(1, steps))
    model.train()
    for _ in range(int(opt["epochs"])):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = _random_shift(train_images[idx].float(), int(opt["shift"]), gen).to(device)
            loss = F.cross_entropy(model(x), train_labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval().requires_grad_(False)
    return model, accuracy(model, val_images, val_labels)


def collect_images(batches: Iterable, max_images: int | None = None) -> tuple[Tensor, Tensor]:
    """One pass of an (images, labels) loader into memory: (uint8 (N,3,H,W), int64 (N,)).

    `images` are float in [0, 1] or uint8; stops once `max_images` are read (then cut to exactly that).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    images, labels, n = [], [], 0
    for x, y in batches:
        images.append(to_uint8(x).cpu())
        labels.append(torch.as_tensor(y).long().cpu())
        n += len(x)
        if max_images is not None and n >= max_images:
            break
    if not images:
        raise ValueError("the loader yielded no images")
    imgs, labs = torch.cat(images), torch.cat(labels)
    if max_images is not None:
        imgs, labs = imgs[:max_images], labs[:max_images]
    return imgs, labs


def classifier_cache_path(cache_dir: str | os.PathLike, fingerprint: str, options: dict[str, Any]) -> Path:
    """Where the classifier for this data fingerprint + training options lives."""
    opt = {**DEFAULT_TRAINING, **options}
    tag = hashlib.sha256(json.dumps(opt, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "domain_classifier" / f"{fingerprint}-{tag}.pt"


def load_domain_classifier(path: str | os.PathLike, *, map_location: Any = "cpu") -> tuple[DomainClassifier, dict]:
    """(model in eval mode, info dict with `val_acc`, `num_classes`, `image_size`, `fingerprint`, options)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    info = blob["info"]
    model = DomainClassifier(
        info["num_classes"], width=info["options"]["width"], feature_dim=info["options"]["feature_dim"]
    )
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False), info


def load_or_train_domain_classifier(
    datamodule: Any,
    cache_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    **options: Any,
) -> tuple[DomainClassifier, dict]:
    """The cached classifier for `datamodule.fingerprint`, trained on its train split on a miss.

    Under DDP rank 0 trains and writes the file (atomically), the other ranks wait and read it.
    """
    fingerprint = str(datamodule.fingerprint)
    path = classifier_cache_path(cache_dir, fingerprint, options)

    def build() -> None:
        if path.is_file():
            return
        opt = {**DEFAULT_TRAINING, **options}
        start = time.perf_counter()
        x_tr, y_tr = collect_images(split_loader(datamodule, "train", whole=True), opt["max_train_images"])
        x_va, y_va = collect_images(split_loader(datamodule, "val", whole=True))
        model, val_acc = train_domain_classifier(
            x_tr.float() / 255,
            y_tr,
            x_va.float() / 255,
            y_va,
            num_classes=int(datamodule.num_classes),
            device=device,
            **options,
        )
        info = dict(
            val_acc=float(val_acc),
            num_classes=int(datamodule.num_classes),
            image_size=int(x_tr.shape[-1]),
            fingerprint=fingerprint,
            options=opt,
            train_images=int(len(x_tr)),
            val_images=int(len(x_va)),
            train_seconds=float(time.perf_counter() - start),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "info": info}, tmp)
        os.replace(tmp, path)
        log.info(
            "domain classifier for %s: val acc %.4f (%.1f s) -> %s", fingerprint, val_acc, info["train_seconds"], path
        )

    rank_zero_first(build)
    model, info = load_domain_classifier(path)
    return model.to(device), info

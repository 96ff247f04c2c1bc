"""Generation metrics: FID, IS, KID, precision/recall and CAS of a generator against a real split.

How the pieces fit:
- One forward of a `FeatureExtractor` per image batch gives features (FID, KID, P&R) and logits
  (IS, CAS). The math is the libraries': torchmetrics' FID / KID / IS metrics fed with precomputed
  features (an identity `feature=` module; docs/DEPENDENCIES.md: a custom module gets its input unchanged) and
  torch-fidelity's `prc_features_to_metric` for precision/recall. Nothing here re-derives a formula.
- DDP: each rank generates its share of the samples; the per-rank features are synced by a
  torchmetrics metric with `cat` states (`FeatureGather`), so `compute()` runs on every rank and every
  rank ends with the same numbers. Sample `i` gets label `i % num_classes` (class-balanced), and batch
  `b` its own seeded generator, so the sample set does not depend on the world size.
- Real statistics: computed once per (dataset fingerprint, split, extractor weights, resolution, real
  sample count) and cached on disk: torchmetrics' FID `real_*` state tensors plus the real features
  (KID and P&R need them), loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from lightning_mim.data.pipeline import dist_info
from lightning_mim.eval.distributed import FeatureGather, barrier, broadcast_object, device_of
from lightning_mim.eval.extractors import EXTRACTORS, FeatureExtractor, build_extractor
from lightning_mim.eval.images import to_uint8
from lightning_mim.eval.loaders import shard_eval_loader, split_loader

log = logging.getLogger(__name__)

FID_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
SPLITS = ("val", "test")
CACHE_VERSION = 1


class _Precomputed(nn.Module):
    """The `feature=` module handed to torchmetrics: our extractor already ran, pass features through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def _progress(iterable: Iterable, total: int, description: str, enabled: bool) -> Iterable:
    """A rich progress bar on rank 0 when stderr is a terminal; the bare iterable otherwise."""
    if not enabled or dist_info(from_env=False)[0] != 0 or not sys.stderr.isatty():
        return iterable
    from rich.progress import track

    return track(iterable, total=total, description=description, transient=True)


# -- metric math (the libraries') -------------------------------------------------------------------


def fid_real_state(real_features: Tensor) -> dict[str, Tensor]:
    """torchmetrics FID's real-side state tensors (feature sum, outer-product sum, count) for a feature set."""
    fid = _fid_metric(real_features.shape[1])
    fid.update(real_features, real=True)
    return {k: getattr(fid, k).detach().cpu().clone() for k in FID_REAL_STATES}


def _fid_metric(num_features: int):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_Precomputed(num_features), sync_on_compute=False)


def frechet_distance(real_state: dict[str, Tensor], fake_features: Tensor) -> float:
    """FID between cached real statistics and a fake feature set, computed by torchmetrics."""
    fid = _fid_metric(fake_features.shape[1])
    for k in FID_REAL_STATES:
        setattr(fid, k, real_state[k].to(fid.device))
    fid.update(fake_features.double(), real=False)
    return float(fid.compute())


def inception_score(logits: Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) IS over `splits` splits of the softmax of `logits`, by torchmetrics (seeded permutation)."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=nn.Identity(), splits=splits, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else 0.0)


def kernel_inception_distance(
    real_features: Tensor, fake_features: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) KID by torchmetrics (cubic polynomial kernel, torch-fidelity's defaults).

    `subset_size` is clamped to the smaller feature set, so small evaluations still get a number.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = int(min(subset_size, len(real_features), len(fake_features)))
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 real and 2 generated samples, got {len(real_features)}, {len(fake_features)}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real_features.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(real_features: Tensor, fake_features: Tensor, *, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.) by torch-fidelity, on the given features.

    Note: torch-fidelity's own default extractor for P&R is VGG16; we use the run's extractor
    (Inception pool3 or the domain classifier), so compare numbers only within this code base.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    n = min(len(real_features), len(fake_features))
    if n <= neighborhood:
        raise ValueError(f"precision/recall with k={neighborhood} needs > {neighborhood} samples per set, got {n}")
    out = prc_features_to_metric(
        fake_features.float(),
        real_features.float(),
        prc_neighborhood=neighborhood,
        save_cpu_ram=max(len(real_features), len(fake_features)) > 20_000,
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])


def classification_accuracy_score(logits: Tensor, labels: Tensor) -> float:
    """CAS: the fraction of class-conditional samples the domain classifier assigns to their requested class."""
    if len(labels) == 0:
        raise ValueError("CAS needs at least one sample")
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def compute_generation_metrics(
    real: "RealStatistics",
    fake_features: Tensor,
    fake_logits: Tensor,
    *,
    name: str,
    labels: Tensor | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    is_splits: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics for one extractor: `fid_{name}`, `is_{name}`, `kid_{name}`, `precision_{name}`, ...

    `labels` (requested classes) adds `cas` when the extractor's logits are over the dataset's
    classes (the domain classifier).
    """
    fake_features, fake_logits = fake_features.cpu(), fake_logits.cpu()
    out: dict[str, float] = {f"fid_{name}": frechet_distance(real.fid_state, fake_features)}
    out[f"is_{name}"], out[f"is_std_{name}"] = inception_score(
        fake_logits, splits=min(is_splits, len(fake_logits)), seed=seed
    )
    out[f"kid_{name}"], out[f"kid_std_{name}"] = kernel_inception_distance(
        real.features, fake_features, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    out[f"precision_{name}"], out[f"recall_{name}"] = precision_recall(
        real.features, fake_features, neighborhood=prc_neighborhood
    )
    if labels is not None and name == "domain":
        out["cas"] = classification_accuracy_score(fake_logits, labels.cpu())
    return out


# -- real statistics and their cache ------------------------------------------------------------


@dataclass
class RealStatistics:
    """What the metrics need from the real split: FID state tensors and the real features (KID, P&R)."""

    fid_state: dict[str, Tensor]
    features: Tensor  # (N, D) float32, CPU
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    @classmethod
    def from_features(cls, features: Tensor, meta: dict[str, Any] | None = None) -> "RealStatistics":
        features = features.detach().float().cpu()
        return cls(fid_real_state(features), features, dict(meta or {}))

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write (temp file + rename): a killed process never leaves a half-written cache."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"fid": self.fid_state, "features": self.features, "meta": self.meta}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RealStatistics":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return cls(blob["fid"], blob["features"], blob["meta"], from_cache=True)


def real_statistics_path(
    cache_dir: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    fingerprint: str,
    split: str,
    resolution: int,
    num_real: int | None,
) -> Path:
    """Cache file of the real statistics; the name hashes every input that changes them."""
    key = dict(
        v=CACHE_VERSION,
        fingerprint=str(fingerprint),
        split=split,
        extractor=extractor.cache_id,
        resolution=int(resolution),
        num_real=num_real,
    )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "real_stats" / f"{extractor.name}-{split}-{digest}.pt"


def _split_loader(datamodule: Any, split: str):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return split_loader(datamodule, split)


@torch.no_grad()
def extract_real_features(
    extractors: Sequence[FeatureExtractor],
    loader: Iterable,
    *,
    device: torch.device,
    num_real: int | None = None,
    progress: bool = True,
) -> list[Tensor]:
    """Features of a real split for each extractor, this rank's share synced over all ranks.

    `loader` yields (images float [0,1] or uint8, labels). Under DDP it must be this rank's shard
    (see `shard_eval_loader`); at most ceil(num_real / world) images are read per rank, and the
    gathered set is cut to `num_real`.
    """
    _, world = dist_info(from_env=False)
    cap = None if num_real is None else -(-int(num_real) // world)
    gathers = [FeatureGather().to(device) for _ in extractors]
    seen = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    for images, labels in _progress(loader, total, "real features", progress):
        if cap is not None:
            if seen >= cap:
                break
            images, labels = images[: cap - seen], labels[: cap - seen]
        images = to_uint8(images.to(device))
        with torch.autocast(device_type=device.type, enabled=False):
            for extractor, gather in zip(extractors, gathers):
                feats, logits = extractor(images)
                gather.update(feats, logits, torch.as_tensor(labels).to(device))
        seen += len(images)
    out = []
    for extractor, gather in zip(extractors, gathers):
        if seen == 0:  # keep the synced states' shapes consistent on a rank that got no data
            gather.update(*_empty_rows(extractor, device))
        feats = gather.compute()[0].cpu()
        out.append(feats if num_real is None else feats[: int(num_real)])
    if any(len(f) < 2 for f in out):
        raise ValueError("the real split yielded fewer than 2 images")
    return out


def _empty_rows(extractor: FeatureExtractor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.zeros(0, extractor.num_features, device=device),
        torch.zeros(0, extractor.num_logits, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
    )


def load_or_compute_real_statistics(
    extractors: Sequence[FeatureExtractor],
    datamodule: Any,
    *,
    cache_dir: str | os.PathLike,
    split: str = "val",
    num_real: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[RealStatistics]:
    """Real statistics per extractor: from the on-disk cache, else computed (all ranks) and cached (rank 0).

    Rank 0 decides hit or miss for everyone, so ranks never disagree about entering the collective
    feature extraction.
    """
    device = torch.device(device)
    fingerprint = str(datamodule.fingerprint)
    resolution = int(datamodule.image_size)
    paths = [
        real_statistics_path(
            cache_dir, e, fingerprint=fingerprint, split=split, resolution=resolution, num_real=num_real
        )
        for e in extractors
    ]
    hits = broadcast_object([p.is_file() for p in paths])
    stats: list[RealStatistics | None] = [RealStatistics.load(p) if hit else None for p, hit in zip(paths, hits)]
    missing = [i for i, s in enumerate(stats) if s is None]
    if missing:
        loader = shard_eval_loader(_split_loader(datamodule, split))
        feats = extract_real_features(
            [extractors[i] for i in missing], loader, device=device, num_real=num_real, progress=progress
        )
        rank, _ = dist_info(from_env=False)
        for i, f in zip(missing, feats):
            meta = dict(
                fingerprint=fingerprint,
                split=split,
                extractor=extractors[i].cache_id,
                resolution=resolution,
                num_real=num_real,
                count=len(f),
            )
            stats[i] = RealStatistics.from_features(f, meta)
            if rank == 0:
                stats[i].save(paths[i])
                log.info("real statistics (%s, %d images) cached at %s", extractors[i].name, len(f), paths[i])
        barrier()
    return stats  # type: ignore[return-value]


# -- generated samples -------------------------------------------------------------------------


def _batch_plan(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """Global batches as (start, stop) sample indices; rank r takes batches r, r + world, ..."""
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of global batch `b`: a pure function of (seed, b), independent of the world size."""
    return int(seed) * 1_000_003 + int(batch_index)


@torch.no_grad()
def generate_features(
    module: Any,
    extractors: Sequence[FeatureExtractor],
    *,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    decode_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
    """Generate `num_samples` images (this rank's share) and extract features with every extractor.

    Returns per extractor (features, logits) gathered over all ranks, and the requested labels
    (None for an unconditional module), in matching order.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    device = torch.device(device) if device is not None else device_of(module)
    rank, world = dist_info(from_env=False)
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    plan = _batch_plan(int(num_samples), int(batch_size))
    mine = [(b, s, e) for b, (s, e) in enumerate(plan) if b % world == rank]
    gathers = [FeatureGather().to(device) for _ in extractors]
    overrides = dict(decode_overrides or {})
    was_training = getattr(module, "training", False)
    if hasattr(module, "eval"):
        module.eval()
    try:
        for b, start, stop in _progress(mine, len(mine), "generating", progress):
            generator = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
            if num_classes > 0:
                labels = torch.arange(start, stop, device=device) % num_classes
                images = module.generate(labels, generator=generator, **overrides)
            else:
                labels = torch.full((stop - start,), -1, dtype=torch.long, device=device)
                images = module.generate(None, stop - start, generator=generator, **overrides)
            if images.shape[0] != stop - start:
                raise RuntimeError(f"generate() returned {images.shape[0]} images, expected {stop - start}")
            images = to_uint8(images)
            with torch.autocast(device_type=device.type, enabled=False):
                for extractor, gather in zip(extractors, gathers):
                    feats, logits = extractor(images)
                    gather.update(feats, logits, labels)
    finally:
        if hasattr(module, "train"):
            module.train(was_training)
    results, labels_out = [], None
    for extractor, gather in zip(extractors, gathers):
        if not mine:
            gather.update(*_empty_rows(extractor, device))
        feats, logits, labels = gather.compute()
        results.append((feats.cpu(), logits.cpu()))
        labels_out = labels.cpu()
    return results, (labels_out if num_classes > 0 else None)


def _as_extractor_list(extractor: str | FeatureExtractor | Sequence[str | FeatureExtractor]) -> list:
    if isinstance(extractor, (str, FeatureExtractor)):
        return [extractor]
    return list(extractor)


SECOND_DRAW_OFFSET = 1_000_003  # beyond any seed a sweep gives its first draws


def second_draw_seed(seed: int) -> int:
    """The evaluation seed of the second draw (`evaluation.second_draw`): the samples of another
    evaluation of the same model, disjoint from every first draw of seeds below SECOND_DRAW_OFFSET."""
    return int(seed) + SECOND_DRAW_OFFSET


def evaluate_generation(
    module: Any,
    datamodule: Any,
    *,
    num_samples: int,
    extractor: str | FeatureExtractor | Sequence[str | FeatureExtractor] = "domain",
    cache_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    decode_overrides: dict[str, Any] | None = None,
    batch_size: int = 64,
    split: str = "val",
    seed: int = 0,
    num_real: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    domain_classifier: dict[str, Any] | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    is_splits: int = 10,
    progress: bool = True,
) -> dict[str, float]:
    """Generate `num_samples` images with `module` and score them against `datamodule`'s `split`.

    `module` follows the stage-2 contract (`num_classes`, `generate(labels, num_samples, *, generator,
    **decode_overrides)`); `datamodule` must be set up (`val_dataloader()`/`test_dataloader()`,
    `fingerprint`, `image_size`, `num_classes`). `extractor` is a name in EXTRACTORS, a built
    `FeatureExtractor`, or a list of them; the images are generated once for all of them. Under DDP
    call it on every rank: each generates num_samples / world_size and all return the same dict.

    Returns {"fid_domain", "is_domain", "is_std_domain", "kid_domain", "kid_std_domain",
    "precision_domain", "recall_domain", "cas", "domain_classifier_acc", "fid_inception", ...}.
    """
    device = torch.device(device) if device is not None else device_of(module)
    built: list[FeatureExtractor] = []
    results: dict[str, float] = {}
    for item in _as_extractor_list(extractor):
        if isinstance(item, FeatureExtractor):
            built.append(item.to(device))
            continue
        if item not in EXTRACTORS:
            raise ValueError(f"unknown feature extractor {item!r}; valid: {list(EXTRACTORS)}")
        ext, info = build_extractor(
            item,
            datamodule=datamodule,
            cache_dir=cache_dir,
            inception_weights=inception_weights,
            domain_classifier=domain_classifier,
            device=device,
        )
        built.append(ext)
        results.update(info)
    if not built:
        raise ValueError("no feature extractor given")
    reals = load_or_compute_real_statistics(
        built, datamodule, cache_dir=cache_dir, split=split, num_real=num_real, device=device, progress=progress
    )
    fakes, labels = generate_features(
        module,
        built,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        device=device,
        decode_overrides=decode_overrides,
        progress=progress,
    )
    for ext, real, (feats, logits) in zip(built, reals, fakes):
        results.update(
            compute_generation_metrics(
                real,
                feats,
                logits,
                name=ext.name,
                labels=labels,
                kid_subsets=kid_subsets,
                kid_subset_size=kid_subset_size,
                prc_neighborhood=prc_neighborhood,
                is_splits=is_splits,
                seed=seed,
            )
        )
    return results

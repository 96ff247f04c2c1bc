"""Generation-metric math: FID / IS / KID / P&R / CAS against torch-fidelity and known values."""

from __future__ import annotations

import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from lightning_mim.eval.images import to_uint8
from lightning_mim.eval.generation import (
    RealStatistics,
    classification_accuracy_score,
    compute_generation_metrics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _features(n: int = 400, d: int = 16, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ mix + shift


def _tf_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    out = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    return out["frechet_inception_distance"]


def test_fid_of_a_set_against_itself_is_zero_and_positive_when_shifted():
    real = _features()
    stats = RealStatistics.from_features(real)
    assert abs(frechet_distance(stats.fid_state, real)) < 1e-6
    shifted = frechet_distance(stats.fid_state, real + 0.5)
    # pure mean shift: FID = |0.5 * 1|^2 = 0.25 * d exactly (same covariance)
    assert shifted == pytest.approx(0.25 * 16, rel=1e-6)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_fid_equals_torch_fidelity_on_the_same_features(shift):
    real, fake = _features(seed=0), _features(n=300, seed=1, shift=shift)
    ours = frechet_distance(RealStatistics.from_features(real).fid_state, fake)
    theirs = _tf_fid(fake, real)
    assert ours > 0.01
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_real_statistics_round_trip_through_a_weights_only_file(tmp_path):
    real, fake = _features(), _features(seed=3, shift=0.2)
    stats = RealStatistics.from_features(real, {"count": 400})
    stats.save(tmp_path / "s.pt")
    loaded = RealStatistics.load(tmp_path / "s.pt")  # torch.load(weights_only=True) inside
    assert loaded.from_cache and not stats.from_cache
    assert loaded.meta == {"count": 400}
    assert torch.equal(loaded.features, stats.features)
    assert frechet_distance(loaded.fid_state, fake) == frechet_distance(stats.fid_state, fake)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temp file


def test_inception_score_known_values_and_torch_fidelity():
    c = 10
    uniform = torch.zeros(100, c)
    assert inception_score(uniform, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    confident = torch.nn.functional.one_hot(torch.arange(100) % c, c).double() * 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(c, rel=1e-4)
    logits = torch.randn(200, c, generator=torch.Generator().manual_seed(0)) * 3
    ours = inception_score(logits, splits=1)[0]
    theirs = isc_features_to_metric(logits, splits=1, shuffle=False)["inception_score_mean"]
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_kid_equals_torch_fidelity_and_is_seeded():
    real, fake = _features(n=120, seed=0), _features(n=120, seed=1, shift=0.4)
    # one subset of all samples: independent of the subset RNG, so both libraries must agree
    ours, _ = kernel_inception_distance(real, fake, subsets=1, subset_size=120)
    theirs = kid_features_to_metric(real, fake, kid_subsets=1, kid_subset_size=120, verbose=False)[
        "kernel_inception_distance_mean"
    ]
    assert ours == pytest.approx(theirs, rel=1e-4)
    a = kernel_inception_distance(real, fake, subsets=5, subset_size=50, seed=3)
    b = kernel_inception_distance(real, fake, subsets=5, subset_size=50, seed=3)
    assert a == b and a[1] > 0  # seeded, and real subsets
    # subset_size above the sample count is clamped instead of failing
    assert kernel_inception_distance(real[:30], fake, subsets=2, subset_size=1000)[0] == pytest.approx(
        kernel_inception_distance(real[:30], fake[:120], subsets=2, subset_size=30)[0]
    )


def test_precision_recall_extremes():
    real = _features(n=200)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    with pytest.raises(ValueError, match="needs > 3 samples"):
        precision_recall(real[:3], real[:3])


def test_cas_perfect_generator_is_one_and_shuffled_is_chance():
    c, n = 10, 5000
    labels = torch.arange(n) % c
    perfect_logits = torch.nn.functional.one_hot(labels, c).float()
    assert classification_accuracy_score(perfect_logits, labels) == 1.0
    shuffled = labels[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    acc = classification_accuracy_score(torch.nn.functional.one_hot(shuffled, c).float(), labels)
    assert acc == pytest.approx(1 / c, abs=0.02)


def test_compute_generation_metrics_names():
    real, fake = _features(n=64), _features(n=64, seed=2)
    logits = torch.randn(64, 4)
    labels = torch.arange(64) % 4
    out = compute_generation_metrics(RealStatistics.from_features(real), fake, logits, name="domain", labels=labels)
    assert set(out) == {
        "fid_domain",
        "is_domain",
        "is_std_domain",
        "kid_domain",
        "kid_std_domain",
        "precision_domain",
        "recall_domain",
        "cas",
    }
    out = compute_generation_metrics(
        RealStatistics.from_features(real), fake, torch.randn(64, 1008), name="inception", labels=labels
    )
    assert "cas" not in out and "fid_inception" in out


def test_to_uint8_rounds_instead_of_truncating():
    k = torch.arange(0, 255).float()
    assert torch.equal(to_uint8((k + 0.6) / 255), (k + 1).to(torch.uint8))
    assert torch.equal(to_uint8((k + 0.4) / 255), k.to(torch.uint8))
    assert to_uint8(torch.tensor([-0.5, 1.5])).tolist() == [0, 255]
    u8 = torch.tensor([3, 200], dtype=torch.uint8)
    assert to_uint8(u8) is u8

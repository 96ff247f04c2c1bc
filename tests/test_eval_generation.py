"""`evaluate_generation` end to end on a fake generator + synthetic data: names, CAS, caching, plumbing."""

from __future__ import annotations

import pytest
import torch

import lightning_mim.eval.generation as gen
from lightning_mim.eval.generation import evaluate_generation, real_statistics_path
from _fakes import FakeGenerator, ProjectionExtractor, SyntheticImageDataModule

DOMAIN = {"epochs": 20}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(module, dm, cache_dir, **kw):
    kw.setdefault("extractor", "domain")
    kw.setdefault("num_samples", 64)
    return evaluate_generation(
        module, dm, cache_dir=cache_dir, batch_size=16, domain_classifier=DOMAIN, progress=False, **kw
    )


def test_metric_names_and_a_perfect_generator(tmp_path):
    dm = SyntheticImageDataModule()
    out = _run(FakeGenerator(), dm, tmp_path, extractor=["domain", ProjectionExtractor()])
    expected = {"domain_classifier_acc", "cas"}
    for name in ("domain", "proj"):
        expected |= {f"{m}_{name}" for m in ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall")}
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())
    assert out["domain_classifier_acc"] >= 0.95
    assert out["cas"] == 1.0
    assert out["precision_domain"] > 0.7 and out["recall_domain"] > 0.7
    # a worse generator (brighter images) has a larger FID and KID under both extractors
    worse = _run(FakeGenerator(brightness=0.15), dm, tmp_path, extractor=["domain", ProjectionExtractor()])
    for name in ("domain", "proj"):
        assert worse[f"fid_{name}"] > 5 * out[f"fid_{name}"] + 1e-3
        assert worse[f"kid_{name}"] > out[f"kid_{name}"]


def test_cas_of_a_label_shuffled_generator_is_chance(tmp_path):
    out = _run(FakeGenerator(shuffle_labels=True), SyntheticImageDataModule(), tmp_path, num_samples=400)
    assert out["cas"] == pytest.approx(0.25, abs=0.08)  # 4 classes


def test_real_statistics_are_computed_once_then_read_from_cache(tmp_path, monkeypatch):
    dm = SyntheticImageDataModule()
    ext = ProjectionExtractor()
    first = _run(FakeGenerator(), dm, tmp_path, extractor=ext)
    path = real_statistics_path(tmp_path, ext, fingerprint=dm.fingerprint, split="val", resolution=16, num_real=None)
    assert path.is_file()

    def no_extraction(*args, **kwargs):
        raise AssertionError("real features recomputed although cached")

    monkeypatch.setattr(gen, "extract_real_features", no_extraction)
    loaded = gen.load_or_compute_real_statistics([ext], dm, cache_dir=tmp_path)[0]
    assert loaded.from_cache and loaded.meta["count"] == 64
    assert _run(FakeGenerator(), dm, tmp_path, extractor=ext) == first  # same seed, cached stats
    # a different real-sample count is another cache entry
    with pytest.raises(AssertionError, match="recomputed"):
        _run(FakeGenerator(), dm, tmp_path, extractor=ext, num_real=32)


def test_num_real_caps_the_real_set(tmp_path):
    dm = SyntheticImageDataModule()
    stats = gen.load_or_compute_real_statistics([ProjectionExtractor()], dm, cache_dir=tmp_path, num_real=20)[0]
    assert len(stats.features) == 20 and int(stats.fid_state["real_features_num_samples"]) == 20


def test_batches_seeds_overrides_and_training_mode(tmp_path):
    module = FakeGenerator().train()
    dm = SyntheticImageDataModule()
    ext = ProjectionExtractor()
    a = _run(module, dm, tmp_path, extractor=ext, num_samples=40, decode_overrides={"steps": 2})
    assert module.generate_calls == [16, 16, 8] and module.training
    b = _run(module, dm, tmp_path, extractor=ext, num_samples=40, seed=1)
    assert a["fid_proj"] != b["fid_proj"]  # another seed, other samples
    with pytest.raises(TypeError, match="bogus"):
        _run(module, dm, tmp_path, extractor=ext, decode_overrides={"bogus": 1})
    with pytest.raises(ValueError, match="valid: \\['domain', 'inception'\\]"):
        _run(module, dm, tmp_path, extractor="clip")
    with pytest.raises(ValueError, match="split"):
        _run(module, dm, tmp_path, extractor=ext, split="train")


def test_labels_are_class_balanced_and_unconditional_has_no_cas(tmp_path):
    module = FakeGenerator()
    seen = []
    original = module.generate

    def spy(labels=None, num_samples=None, **kw):
        seen.append(None if labels is None else labels.clone())
        return original(labels, num_samples, **kw)

    module.generate = spy
    _run(module, SyntheticImageDataModule(), tmp_path, extractor=ProjectionExtractor(), num_samples=40)
    labels = torch.cat(seen)
    assert labels.tolist() == [i % 4 for i in range(40)]

    uncond = _run(FakeGenerator(num_classes=0), SyntheticImageDataModule(), tmp_path, extractor=ProjectionExtractor())
    assert "cas" not in uncond and "fid_proj" in uncond


def test_batch_seed_does_not_depend_on_world_size():
    plan = gen._batch_plan(50, 16)
    assert plan == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert len({gen.batch_seed(0, b) for b in range(100)} | {gen.batch_seed(1, b) for b in range(100)}) == 200

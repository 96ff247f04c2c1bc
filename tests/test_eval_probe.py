"""Linear probe, k-NN and few-shot on synthetic features with known separability."""

from __future__ import annotations

import pytest
import torch

from lightning_mim.eval.probe import fewshot_indices, fewshot_top1, knn_top1, probe_head, train_linear_probe

C, D = 10, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _noisy_onehot(n: int, seed: int, noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Features = one-hot label in the first C dims (scaled) + Gaussian noise in all D dims."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = noise * torch.randn(n, D, generator=g)
    x[:, :C] += torch.nn.functional.one_hot(y, C).float()
    return x * 3.0 + 1.0, y  # scale and offset: the BatchNorm in the head must cope


def _noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def test_probe_on_noisy_onehot_features_beats_90_percent():
    (tx, ty), (vx, vy) = _noisy_onehot(2000, 0), _noisy_onehot(1000, 1)
    res = train_linear_probe(tx, ty, vx, vy, num_classes=C)
    assert res.top1 >= 0.90, res.top1
    assert res.train_top1 >= 0.90
    full = train_linear_probe(tx, ty, vx, vy, num_classes=C, batch_size=None, epochs=100)
    assert full.top1 >= 0.90, full.top1
    adam = train_linear_probe(tx, ty, vx, vy, num_classes=C, optimizer="adam", lr=1e-2)
    assert adam.top1 >= 0.90, adam.top1
    lbfgs = train_linear_probe(tx, ty, vx, vy, num_classes=C, optimizer="lbfgs", weight_decay=1e-4)
    assert lbfgs.top1 >= 0.90, lbfgs.top1


def test_probe_on_pure_noise_is_about_chance():
    (tx, ty), (vx, vy) = _noise(2000, 0), _noise(2000, 1)
    res = train_linear_probe(tx, ty, vx, vy, num_classes=C)
    assert res.top1 == pytest.approx(1 / C, abs=0.04), res.top1
    res = train_linear_probe(tx, ty, vx, vy, num_classes=C, optimizer="lbfgs", weight_decay=1e-3)
    assert res.top1 == pytest.approx(1 / C, abs=0.04), res.top1


def test_lbfgs_probe_is_logistic_regression_solved_to_the_optimum():
    """lbfgs + weight decay wd minimises mean CE + wd/2·||W||² on standardised features: the same
    problem as scikit-learn's LogisticRegression(C = 1 / (wd·n)) on StandardScaler features, so the
    two solutions coincide."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (tx, ty), (vx, vy) = _noisy_onehot(600, 0, noise=1.0), _noisy_onehot(400, 1, noise=1.0)
    wd = 1e-2
    res = train_linear_probe(tx, ty, vx, vy, num_classes=C, optimizer="lbfgs", weight_decay=wd, epochs=50)
    scaler = StandardScaler().fit(tx.double().numpy())
    ref = LogisticRegression(C=1 / (wd * len(tx)), max_iter=5000, tol=1e-10).fit(scaler.transform(tx.double().numpy()), ty.numpy())
    torch.testing.assert_close(res.head[1].weight.double(), torch.from_numpy(ref.coef_), atol=2e-3, rtol=0)
    agree = (res.head(vx).argmax(1).numpy() == ref.predict(scaler.transform(vx.double().numpy()))).mean()
    assert agree >= 0.99, agree
    assert res.top1 == pytest.approx(ref.score(scaler.transform(vx.double().numpy()), vy.numpy()), abs=0.01)
    # it fits where a fixed SGD budget under-fits: on noisy features the optimum is reached, not approached
    sgd = train_linear_probe(tx, ty, vx, vy, num_classes=C, epochs=1, lr=1e-3)
    assert res.train_top1 > sgd.train_top1


def test_probe_head_is_batchnorm_without_affine_plus_linear_and_deterministic():
    head = probe_head(D, C)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert isinstance(head[1], torch.nn.Linear) and head[1].out_features == C
    (tx, ty), (vx, vy) = _noisy_onehot(300, 0), _noisy_onehot(100, 1)
    state = torch.random.get_rng_state()
    a = train_linear_probe(tx, ty, vx, vy, num_classes=C, epochs=3, seed=5)
    b = train_linear_probe(tx, ty, vx, vy, num_classes=C, epochs=3, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a.head[1].weight, b.head[1].weight)


def test_knn():
    (tx, ty), (vx, vy) = _noisy_onehot(2000, 0), _noisy_onehot(500, 1)
    assert knn_top1(tx, ty, vx, vy, num_classes=C) >= 0.90
    (nx, ny), (mx, my) = _noise(2000, 0), _noise(1000, 1)
    assert knn_top1(nx, ny, mx, my, num_classes=C) == pytest.approx(1 / C, abs=0.04)
    # k=1 on the training set itself is exact (each point is its own nearest neighbour)
    assert knn_top1(tx, ty, tx, ty, num_classes=C, k=1) == 1.0
    # k larger than the training set is clamped
    assert 0 <= knn_top1(tx[:5], ty[:5], vx, vy, num_classes=C, k=20) <= 1


def test_fewshot_indices_and_accuracy():
    (tx, ty), (vx, vy) = _noisy_onehot(1000, 0), _noisy_onehot(500, 1)
    idx = fewshot_indices(ty, 5, seed=0)
    assert len(idx) == 5 * C and torch.bincount(ty[idx], minlength=C).tolist() == [5] * C
    assert torch.equal(idx, fewshot_indices(ty, 5, seed=0))
    assert not torch.equal(idx, fewshot_indices(ty, 5, seed=1))
    five = fewshot_top1(tx, ty, vx, vy, shots=5, num_classes=C)
    assert 0.7 <= five < train_linear_probe(tx, ty, vx, vy, num_classes=C).top1  # fewer labels, lower accuracy
    with pytest.raises(ValueError, match="fewer than shots"):
        fewshot_indices(ty[:20], 5)


def test_bad_arguments():
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="valid: \\['lbfgs', 'sgd', 'adam'\\]"):
        train_linear_probe(x, y, x, y, num_classes=2, optimizer="lars")
    with pytest.raises(ValueError, match="expected features"):
        train_linear_probe(x[:, 0], y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="k must be"):
        knn_top1(x, y, x, y, num_classes=2, k=0)

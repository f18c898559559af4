"""Tests for pixcell_ext.evaluation.metrics: FD, KID, improved precision/recall, pairwise diversity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from pixcell_ext.evaluation import metrics
from pixcell_ext.evaluation.metrics import (
    FeatureStats,
    density_coverage,
    fast_frechet_distance,
    fd_sample_warning,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)
from pixcell_ext.evaluation.pairwise import mean_pairwise


class _Projection(nn.Module):
    """Stand-in feature extractor: a fixed linear projection of the flattened image, in float64."""

    def __init__(self, in_features: int, num_features: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(in_features, num_features, generator=g, dtype=torch.float64))
        self.num_features = num_features  # lets torchmetrics skip its 299 px dummy forward

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs.reshape(imgs.shape[0], -1).to(torch.float64) @ self.weight


def _random_conv_features(images: torch.Tensor) -> np.ndarray:
    """Features from a small fixed random conv net (non-linear), [B, 32]."""
    torch.manual_seed(1234)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():
        return net(images).double().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------


def test_fd_of_set_against_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)) * rng.uniform(0.5, 3.0, size=32) + 5.0
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(frechet_distance(x, x)) < 1e-6 * scale
    # Shifting one copy by a known vector adds exactly |shift|^2 (covariances are unchanged).
    shift = np.full(32, 0.5)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fd_matches_closed_form_for_known_gaussians() -> None:
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) = |dmu|^2 + sum (sqrt s1 - sqrt s2)^2.
    s1 = np.array([1.0, 4.0, 9.0])
    s2 = np.array([4.0, 1.0, 9.0])
    a = FeatureStats(mean=np.zeros(3), cov=np.diag(s1), n=100)
    b = FeatureStats(mean=np.array([1.0, 0.0, 2.0]), cov=np.diag(s2), n=100)
    expected = 5.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance_from_stats(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fd_increases_monotonically_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    # Structured images: smooth random blobs, so the conv features have a non-trivial distribution.
    base = torch.nn.functional.interpolate(torch.rand(600, 3, 4, 4, generator=g), size=16, mode="bilinear")
    noise = torch.randn(base.shape, generator=g)
    real = _random_conv_features(base)
    levels = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    fds = [frechet_distance(real, _random_conv_features(base + s * noise)) for s in levels]
    assert abs(fds[0]) < 1e-9 * np.trace(np.cov(real, rowvar=False))
    assert all(b > a for a, b in zip(fds, fds[1:], strict=False)), fds
    assert fds[-1] > 10 * fds[1]


def test_fd_matches_torchmetrics() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    real_imgs = torch.rand(300, 3, 8, 8, generator=g)
    fake_imgs = (torch.rand(300, 3, 8, 8, generator=g) * 0.8 + 0.15) ** 1.5
    extractor = _Projection(3 * 8 * 8, 24)
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    for chunk in real_imgs.split(64):
        fid.update(chunk, real=True)
    for chunk in fake_imgs.split(64):
        fid.update(chunk, real=False)
    reference = float(fid.compute())
    ours = frechet_distance(extractor(real_imgs), extractor(fake_imgs))
    assert reference > 1.0  # the two sets genuinely differ, so agreement is not trivial
    assert ours == pytest.approx(reference, abs=1e-3)


def test_feature_stats_roundtrip_and_reuse(tmp_path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) + 0.3
    stats = FeatureStats.from_features(torch.from_numpy(x).float())
    stats.save(tmp_path / "real.npz")
    loaded = FeatureStats.load(tmp_path / "real.npz")
    assert loaded.n == 200 and loaded.dim == 8
    np.testing.assert_allclose(loaded.cov, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-10)
    assert frechet_distance(loaded, y) == pytest.approx(frechet_distance(x.astype(np.float32), y), rel=1e-9)


def test_fd_singular_fallback_and_imaginary_check(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(100, 6)), rng.normal(size=(100, 6))
    clean = frechet_distance(x, y)

    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_first_call(a: np.ndarray) -> np.ndarray:
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", failing_first_call)
    with pytest.warns(RuntimeWarning, match="singular"):
        regularised = frechet_distance(x, y, eps=1e-6)
    assert len(calls) == 2
    assert regularised == pytest.approx(clean, abs=1e-4)
    monkeypatch.undo()

    # A non-PSD "covariance" has negative eigenvalues, so its square root is genuinely complex: must raise.
    bad = FeatureStats(mean=np.zeros(2), cov=np.diag([1.0, -1.0]), n=10)
    good = FeatureStats(mean=np.zeros(2), cov=np.eye(2), n=10)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance_from_stats(bad, good)


def test_fd_input_validation_and_rank_deficient_case() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError):
        frechet_distance(np.full((10, 4), np.nan), np.zeros((10, 4)))
    # Fewer samples than dimensions: still finite (scipy may warn about the singular product).
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = frechet_distance(rng.normal(size=(20, 50)), rng.normal(size=(20, 50)))
    assert np.isfinite(value) and value > 0


def test_fd_sample_warning() -> None:
    assert fd_sample_warning(10_000, 2048) is None
    assert fd_sample_warning(2049, 2048) is None
    text = fd_sample_warning(500, 1536)
    assert text is not None and "500" in text and "1536" in text
    assert fd_sample_warning(2048, 2048) is not None  # n == dim: rank <= n - 1 < dim


# ---------------------------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------------------------


def test_kid_same_distribution_near_zero_and_shift_positive() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    mean, std = kernel_inception_distance(a, b, subset_size=200, num_subsets=50, seed=0)
    assert std > 0
    assert abs(mean) < 3 * std
    shifted = rng.normal(size=(600, 16)) + 0.5
    mean_s, std_s = kernel_inception_distance(a, shifted, subset_size=200, num_subsets=50, seed=0)
    assert mean_s > 10 * std_s
    assert mean_s > 20 * abs(mean)


def test_kid_matches_torchmetrics_and_direct_formula() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real_imgs = torch.rand(120, 3, 8, 8, generator=g)
    fake_imgs = torch.rand(120, 3, 8, 8, generator=g) ** 1.3
    extractor = _Projection(3 * 8 * 8, 16, seed=1)
    # subset_size = n makes every subset the full set, so torchmetrics' unseeded permutation is irrelevant.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=3, subset_size=120, normalize=True)
    kid.update(real_imgs, real=True)
    kid.update(fake_imgs, real=False)
    ref_mean, _ = kid.compute()
    fr, ff = extractor(real_imgs), extractor(fake_imgs)
    ours_mean, ours_std = kernel_inception_distance(fr, ff, subset_size=120, num_subsets=3)
    assert float(ref_mean) > 0.1
    assert ours_mean == pytest.approx(float(ref_mean), rel=1e-9)
    assert ours_std == pytest.approx(0.0, abs=1e-9 * ours_mean)

    # Direct evaluation of the unbiased estimator on the full sets, written out term by term.
    x, y = fr.numpy(), ff.numpy()
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    direct = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert ours_mean == pytest.approx(direct, rel=1e-9)


def test_kid_defaults_seeding_and_errors() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(30, 8)) + 1.0
    # Default subset size adapts to the smaller set (30) instead of failing on the 1000 default.
    m1 = kernel_inception_distance(a, b, num_subsets=10, seed=5)
    assert m1 == kernel_inception_distance(a, b, num_subsets=10, seed=5)
    assert m1 != kernel_inception_distance(a, b, num_subsets=10, seed=6)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(a, b, subset_size=31)


# ---------------------------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------------------------


def test_precision_recall_identical_sets() -> None:
    x = np.random.default_rng(0).normal(size=(300, 10))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_sets() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10))
    y = rng.normal(size=(200, 10)) + 100.0
    assert precision_recall(x, y, k=3) == (0.0, 0.0)


def test_precision_recall_mode_collapse() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, 4)) * 20.0
    real = centres[rng.integers(0, 10, size=1000)] + rng.normal(size=(1000, 4))
    # Generator collapsed onto 2 of the 10 modes, with realistic samples there.
    collapsed = centres[rng.integers(0, 2, size=600)] + rng.normal(size=(600, 4))
    precision, recall = precision_recall(real, collapsed, k=3, batch_size=128)
    assert precision > 0.85
    assert recall < 0.3
    # Control: a generator covering all modes keeps the precision and recovers the recall.
    covering = centres[rng.integers(0, 10, size=1000)] + rng.normal(size=(1000, 4))
    precision_c, recall_c = precision_recall(real, covering, k=3, batch_size=128)
    assert precision_c > 0.85
    assert recall_c > 0.85


def test_precision_recall_batching_invariance_and_brute_force() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(150, 5)), rng.normal(size=(120, 5)) * 1.3 + 0.2
    k = 3
    dxx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    dyy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    dyx = np.linalg.norm(y[:, None] - x[None], axis=-1)
    rx = np.sort(dxx, axis=1)[:, k]
    ry = np.sort(dyy, axis=1)[:, k]
    expected = ((dyx <= rx[None]).any(1).mean(), (dyx.T <= ry[None]).any(1).mean())
    assert 0.05 < expected[0] < 0.99 and 0.05 < expected[1] < 0.99  # non-degenerate case
    for bs in (7, 1024):
        p, r = precision_recall(x, y, k=k, batch_size=bs, dtype=torch.float64)
        assert (p, r) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        precision_recall(x[:3], y, k=3)


def _brute_force_density_coverage(x: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al. 2020 written as the paper's sums, with explicit loops."""
    radii = []
    for i in range(len(x)):
        others = sorted(float(np.linalg.norm(x[i] - x[j])) for j in range(len(x)) if j != i)
        radii.append(others[k - 1])
    inside = [[float(np.linalg.norm(y[j] - x[i])) <= radii[i] for i in range(len(x))] for j in range(len(y))]
    density = sum(sum(row) for row in inside) / (k * len(y))
    coverage = sum(any(inside[j][i] for j in range(len(y))) for i in range(len(x))) / len(x)
    return density, coverage


@pytest.mark.parametrize("k", [1, 3, 5])
def test_density_coverage_equal_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    x, y = rng.normal(size=(60, 4)), rng.normal(0.4, 1.3, size=(45, 4))
    expected = _brute_force_density_coverage(x, y, k)
    assert 0.05 < expected[1] < 0.99  # not a degenerate case
    for batch_size in (7, 1024):
        got = density_coverage(x, y, k=k, batch_size=batch_size, dtype=torch.float64)
        assert got == pytest.approx(expected, abs=1e-12)
    far = density_coverage(x, y + 100.0, k=k)
    assert far == (0.0, 0.0)  # fakes far from every real ball
    same = density_coverage(x, x, k=k)
    assert same[1] == 1.0 and same[0] >= 1.0  # each real sample sits in its own ball (and k others' balls)


def test_fast_frechet_distance_equals_frechet_distance_on_both_routes() -> None:
    rng = np.random.default_rng(0)
    for n, m, d in [(40, 30, 64), (300, 250, 16)]:  # fewer samples than dimensions, then more
        x, y = rng.normal(size=(n, d)), rng.normal(0.2, 1.1, size=(m, d))
        assert fast_frechet_distance(x, y) == pytest.approx(frechet_distance(x, y), rel=1e-6)


def test_mmd2_unbiased_is_kid_on_the_whole_set_and_unbiased_on_class_stratified_sets() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)), rng.normal(0.3, 1.0, size=(40, 8))
    whole, _ = kernel_inception_distance(x, y, subset_size=40, num_subsets=1)
    assert mmd2_unbiased(x, y) == pytest.approx(whole, rel=1e-12)
    assert mmd2_unbiased(x, y, real_groups=["a"] * 40, fake_groups=["a"] * 40) == pytest.approx(whole, rel=1e-12)

    # Equal distributions, 20 tiles of each of 9 well-separated classes per side: the plain U-statistic sees
    # same-class pairs slightly less often within a set than across sets, and is biased below zero.
    centres, labels = rng.normal(0, 3, (9, 16)), np.repeat(np.arange(9).astype(str), 20)
    plain, stratified = [], []
    for _ in range(20):
        a, b = (
            centres[labels.astype(int)] + rng.normal(size=(180, 16)),
            centres[labels.astype(int)] + rng.normal(size=(180, 16)),
        )
        plain.append(mmd2_unbiased(a, b))
        stratified.append(mmd2_unbiased(a, b, real_groups=labels, fake_groups=labels))
    error = np.std(stratified) / np.sqrt(len(stratified))
    assert abs(np.mean(stratified)) < 3 * error < abs(np.mean(plain))


# ---------------------------------------------------------------------------------------------------------------
# Pairwise diversity helper
# ---------------------------------------------------------------------------------------------------------------


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def test_mean_pairwise_exact_and_sampled() -> None:
    items = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = torch.cdist(items, items)
    iu = torch.triu_indices(30, 30, offset=1)
    expected = full[iu[0], iu[1]]
    mean, std = mean_pairwise(_l2, items, max_pairs=10_000, batch_size=50)
    assert mean == pytest.approx(float(expected.mean()), rel=1e-12)
    assert std == pytest.approx(float(expected.std(unbiased=False)), rel=1e-10)
    # Sampling 200 of the 435 pairs: close to the exact mean, reproducible, never a self-pair.
    seen: list[torch.Tensor] = []

    def recording(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(_l2(a, b))
        return seen[-1]

    sampled = mean_pairwise(recording, items, max_pairs=200, seed=3)
    assert sampled == mean_pairwise(_l2, items, max_pairs=200, seed=3)
    assert sampled[0] == pytest.approx(mean, rel=0.1)
    assert torch.cat(seen).min() > 0
    collapsed = items[:1].repeat(10, 1)
    assert mean_pairwise(_l2, collapsed)[0] == 0.0

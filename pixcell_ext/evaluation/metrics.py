"""Distribution metrics on feature matrices: Fréchet distance, KID, improved precision/recall.

Everything here works on precomputed features of shape ``[N, D]`` (numpy arrays or torch tensors, any float or
int dtype). No feature extractor is loaded in this module, so the same functions serve Inception, UNI2-h or any
other embedding, and the caller decides which network the numbers refer to. A number from these functions is
only comparable with another number computed on the same feature extractor, the same preprocessing and (for the
Fréchet distance, whose finite-sample bias depends on N) the same number of images.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor

__all__ = [
    "FeatureStats",
    "as_feature_matrix",
    "fd_sample_warning",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kernel_inception_distance",
    "density_coverage",
    "fast_frechet_distance",
    "mmd2_unbiased",
    "precision_recall",
]


def as_feature_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """Return ``x`` as a 2-D float64 numpy array, with a clear error on bad shapes or non-finite values."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_tensor(x: ArrayLike, name: str, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """Return ``x`` as a 2-D tensor of ``dtype`` on ``device`` (checked like :func:`_as_float64_numpy`)."""
    t = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {tuple(t.shape)}")
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------


def fd_sample_warning(n: int, dim: int) -> str | None:
    """Return a warning text when ``n`` samples cannot give a full-rank covariance in ``dim`` dimensions.

    A sample covariance of ``n`` points has rank at most ``n - 1``, so it is singular whenever ``n <= dim``. The
    Fréchet distance is then computed from a degenerate Gaussian: the value is strongly biased (upwards, and by
    an amount that depends on ``n``) and cannot be compared with values computed on a different number of images,
    nor with published numbers (FID on Inception features is conventionally reported on 10k-50k images for 2048-d
    features). Below the threshold the distance is still well defined and this module still computes it; the
    warning is there so that reports carry the caveat. Note that the Fréchet distance is biased for every finite
    ``n`` (the bias shrinks roughly like 1/n), so even above the threshold only equal-``n`` comparisons are fair.
    """
    if n <= dim:
        return (
            f"Fréchet distance computed on {n} samples of {dim}-d features: the covariance is rank-deficient "
            f"(rank <= {max(n - 1, 0)} < {dim}), so the value is strongly biased and only comparable with values "
            f"computed on the same number of samples and the same features; use more than {dim} images "
            f"(ideally several times more) or report KID, which is unbiased."
        )
    return None


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of a feature set: everything the Fréchet distance needs from one side.

    Keeping these lets a class's real statistics be computed once (over e.g. 10k real tiles) and reused against
    every synthetic set, and lets them be cached on disk with :meth:`save` / :meth:`load`.
    """

    mean: np.ndarray  # [D]
    cov: np.ndarray  # [D, D], unbiased (ddof=1), the convention of the FID literature and of torchmetrics
    n: int

    @classmethod
    def from_features(cls, features: ArrayLike) -> FeatureStats:
        """Compute the statistics of a ``[N, D]`` feature matrix in float64 (N >= 2)."""
        x = as_feature_matrix(features, "features")
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}")
        mean = x.mean(axis=0)
        centred = x - mean
        # Centring before the product (rather than E[xx^T] - mu mu^T) avoids cancellation when the mean is large
        # compared with the spread, which is common for post-activation features.
        cov = centred.T @ centred / (x.shape[0] - 1)
        return cls(mean=mean, cov=cov, n=int(x.shape[0]))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def save(self, path: str | Path) -> None:
        """Write the statistics to an ``.npz`` file."""
        np.savez(path, mean=self.mean, cov=self.cov, n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by :meth:`save`."""
        with np.load(path) as data:
            return cls(mean=data["mean"].astype(np.float64), cov=data["cov"].astype(np.float64), n=int(data["n"]))


def _sqrtm_product_trace(cov1: np.ndarray, cov2: np.ndarray, *, eps: float, imag_tol: float) -> tuple[float, bool]:
    """Return ``trace(sqrtm(cov1 @ cov2))`` and whether the eps fallback was needed.

    ``cov1 @ cov2`` is not symmetric, but for PSD inputs it is similar to the PSD matrix
    ``cov1^1/2 cov2 cov1^1/2``, so its eigenvalues are real and non-negative and its principal square root is real.
    In floating point, near-zero eigenvalues can come out slightly negative or complex, which makes the Schur-based
    ``sqrtm`` return small imaginary parts; these are discarded. When the product is (numerically) singular the
    Schur method can fail outright (non-finite output); the usual remedy, kept here, is to add ``eps * I`` to both
    covariances, which moves the result by O(eps * D). A large imaginary part means the inputs were not valid
    covariances (or were badly conditioned beyond rescue) and is an error rather than something to hide.
    """
    dim = cov1.shape[0]
    fallback = False
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        fallback = True
        offset = np.eye(dim) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
        if not np.isfinite(covmean).all():
            raise FloatingPointError("matrix square root of the covariance product is not finite even with eps added")
    if np.iscomplexobj(covmean):
        # Tolerance relative to the average feature variance so that the check does not depend on feature scale
        # (rescaling features by c scales covariances, covmean and its imaginary noise all by c^2).
        scale = max((np.trace(cov1) + np.trace(cov2)) / (2 * dim), np.finfo(np.float64).tiny)
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > imag_tol * scale:
            raise ValueError(
                f"matrix square root has a large imaginary component ({max_imag:.3g}, relative "
                f"{max_imag / scale:.3g} > {imag_tol}); the covariance matrices are probably not valid (PSD)"
            )
        covmean = covmean.real
    return float(np.trace(covmean)), fallback


def frechet_distance_from_stats(
    real: FeatureStats, fake: FeatureStats, *, eps: float = 1e-6, imag_tol: float = 1e-3
) -> float:
    """Fréchet distance between the Gaussians N(mu_r, S_r) and N(mu_f, S_f) fitted to two feature sets.

    d² = |mu_r - mu_f|² + tr(S_r + S_f - 2 (S_r S_f)^1/2), the closed form of the 2-Wasserstein distance between
    Gaussians (Dowson & Landau), popularised as FID by Heusel et al. 2017. Like the FID literature this returns the
    *squared* distance. The value is not clipped at zero: a tiny negative result (round-off, |value| ~ 1e-10 of
    the feature variance) can occur for identical sets.
    """
    if real.dim != fake.dim:
        raise ValueError(f"feature dimensions differ: real {real.dim}, fake {fake.dim}")
    diff = real.mean - fake.mean
    tr_covmean, fallback = _sqrtm_product_trace(real.cov, fake.cov, eps=eps, imag_tol=imag_tol)
    if fallback:
        warnings.warn(
            f"covariance product is singular; added {eps} to the covariance diagonals before the matrix square root",
            RuntimeWarning,
            stacklevel=2,
        )
    return float(diff @ diff + np.trace(real.cov) + np.trace(fake.cov) - 2.0 * tr_covmean)


def frechet_distance(
    real: ArrayLike | FeatureStats,
    fake: ArrayLike | FeatureStats,
    *,
    eps: float = 1e-6,
    imag_tol: float = 1e-3,
) -> float:
    """Fréchet distance (FID when the features are Inception pool features) between two ``[N, D]`` feature sets.

    Either side may be a precomputed :class:`FeatureStats`. All arithmetic is float64: in float32 the trace terms
    (sums of D variances) and the matrix square root lose several digits, and for D = 1536-2048 that error is of
    the same order as the differences between good models. See :func:`fd_sample_warning` for the sample-size caveat
    (call it yourself for reports; this function only computes).
    """
    real_stats = real if isinstance(real, FeatureStats) else FeatureStats.from_features(real)
    fake_stats = fake if isinstance(fake, FeatureStats) else FeatureStats.from_features(fake)
    return frechet_distance_from_stats(real_stats, fake_stats, eps=eps, imag_tol=imag_tol)


# ----------------------------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ----------------------------------------------------------------------------------------------------------------


def _polynomial_mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased estimate of MMD² between samples ``x`` [m, d] and ``y`` [n, d] with k(a, b) = (a·b / d + 1)³.

    The within-set terms drop the diagonal (k(x_i, x_i) is not an independent pair), which is what makes the
    estimator unbiased; the cross term uses every pair. For m = n this is the estimator of Bińkowski et al. 2018
    ("Demystifying MMD GANs"), the definition of KID.
    """
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    sum_xx = k_xx.sum() - torch.diagonal(k_xx).sum()
    sum_yy = k_yy.sum() - torch.diagonal(k_yy).sum()
    return sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n)


def kernel_inception_distance(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    subset_size: int | None = None,
    num_subsets: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """KID: unbiased MMD² with the cubic polynomial kernel, averaged over random subsets; returns (mean, std).

    Why KID next to FD: its estimator is unbiased, so its expected value does not depend on the number of images,
    and it makes no Gaussian assumption. That makes it the usable distance for small per-class sets (a few hundred
    tiles of a rare class), where the Fréchet distance is dominated by its finite-sample bias.

    Each subset draws ``subset_size`` real and ``subset_size`` fake rows without replacement (rows may recur across
    subsets), as in the reference implementation of Bińkowski et al. and in torchmetrics. ``std`` is the
    population standard deviation of the per-subset estimates (torchmetrics' convention): it describes the spread
    of a single subset estimate, not the standard error of the mean. The default subset size is
    ``min(1000, n_real, n_fake)`` so that small sets still work. Sampling uses a numpy generator seeded by ``seed``
    (the global RNGs are untouched), so results are reproducible. Computed in float64 on ``device`` (CPU default).
    """
    x = _as_tensor(real, "real", torch.float64, device)
    y = _as_tensor(fake, "fake", torch.float64, device)
    n_real, n_fake = x.shape[0], y.shape[0]
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got real={n_real}, fake={n_fake}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    if subset_size is None:
        subset_size = min(1000, n_real, n_fake)
    if not 2 <= subset_size <= min(n_real, n_fake):
        raise ValueError(
            f"subset_size must be in [2, min(n_real, n_fake)] = [2, {min(n_real, n_fake)}], got {subset_size}"
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")

    rng = np.random.default_rng(seed)
    scores = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        idx_r = torch.from_numpy(rng.choice(n_real, size=subset_size, replace=False)).to(x.device)
        idx_f = torch.from_numpy(rng.choice(n_fake, size=subset_size, replace=False)).to(y.device)
        scores[i] = float(_polynomial_mmd2_unbiased(x[idx_r], y[idx_f]))
    return float(scores.mean()), float(scores.std())


# ----------------------------------------------------------------------------------------------------------------
# Improved precision / recall
# ----------------------------------------------------------------------------------------------------------------


def _squared_distances(a: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances between rows of ``a`` [p, d] and ``b`` [q, d] via the matmul expansion."""
    a_sq = (a * a).sum(dim=1, keepdim=True)
    return (a_sq + b_sq.unsqueeze(0) - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _knn_radii_sq(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Squared distance from every row of ``x`` to its k-th nearest *other* row of ``x``."""
    x_sq = (x * x).sum(dim=1)
    radii = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        d2 = _squared_distances(x[start : start + batch_size], x, x_sq)
        # k + 1 smallest: the first is the point itself (distance 0), so entry k is the k-th true neighbour.
        radii[start : start + batch_size] = torch.topk(d2, k + 1, dim=1, largest=False).values[:, k]
    return radii


def _fraction_inside(queries: Tensor, support: Tensor, support_radii_sq: Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` lying in the union of balls centred on ``support`` with the given squared radii."""
    support_sq = (support * support).sum(dim=1)
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        d2 = _squared_distances(queries[start : start + batch_size], support, support_sq)
        inside += int((d2 <= support_radii_sq.unsqueeze(0)).any(dim=1).sum())
    return inside / queries.shape[0]


def _centred_pair(
    real: ArrayLike, fake: ArrayLike, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """Both sets as tensors centred on the real mean: distances are unchanged, and the matmul expansion of the
    squared distances loses less precision."""
    x = _as_tensor(real, "real", dtype, device)
    y = _as_tensor(fake, "fake", dtype, device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    centre = x.mean(dim=0, keepdim=True)
    return x - centre, y - centre


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    k: int = 3,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019); returns (precision, recall) in [0, 1].

    Each set's manifold is approximated by the union of balls around its samples, each ball's radius being the
    distance to that sample's k-th nearest neighbour within the same set (k = 3 is the paper's default). Precision is
    the fraction of fake samples inside the real manifold (fidelity: how many generated images look like some real
    ones); recall is the fraction of real samples inside the fake manifold (coverage: how much of the real variety
    the generator reaches). Unlike FD/KID, the two numbers separate "bad images" from "missing modes".

    Distances are computed batch by batch against the full other set, so memory is O(batch_size * N) and 10k x 10k
    sets in 1-2k dimensions fit easily on CPU or GPU. Radii and distances use the same squared-distance routine,
    so a sample identical to a support point is always counted as inside. The radii depend on the sample size, so
    compare precision/recall only across equal set sizes (the paper uses equally many real and fake samples).
    ``float32`` is accurate enough here (only comparisons between distances matter); pass ``torch.float64`` if
    features have a huge offset relative to their spread.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x, y = _centred_pair(real, fake, dtype, device)
    if min(x.shape[0], y.shape[0]) <= k:
        raise ValueError(f"each set needs more than k={k} samples, got real={x.shape[0]}, fake={y.shape[0]}")
    with torch.no_grad():
        precision = _fraction_inside(y, x, _knn_radii_sq(x, k, batch_size), batch_size)
        recall = _fraction_inside(x, y, _knn_radii_sq(y, k, batch_size), batch_size)
    return precision, recall


def density_coverage(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    k: int = 5,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020); returns (density, coverage).

    Both use only the real k-NN balls (radius: distance to the k-th nearest other real sample), so a few outlying
    fakes cannot inflate them the way they inflate the fake manifold of recall. Density = (1 / kM) x the number of
    (fake, real ball) pairs with the fake inside the ball: about 1 when fakes are distributed like the reals, above
    1 when they crowd into dense real regions, below when they fall outside. Coverage = fraction of real balls that
    hold at least one fake: how much of the real distribution the generator reaches (in [0, 1]). k = 5 is the
    paper's default.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x, y = _centred_pair(real, fake, dtype, device)
    if x.shape[0] <= k or y.shape[0] < 1:
        raise ValueError(
            f"density/coverage need more than k={k} real samples and one fake, got {x.shape[0]} and {y.shape[0]}"
        )
    with torch.no_grad():
        radii = _knn_radii_sq(x, k, batch_size)
        x_sq = (x * x).sum(dim=1)
        inside_count, covered = 0, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for start in range(0, y.shape[0], batch_size):
            inside = _squared_distances(y[start : start + batch_size], x, x_sq) <= radii.unsqueeze(0)
            inside_count += int(inside.sum())
            covered |= inside.any(dim=0)
    return inside_count / (k * y.shape[0]), int(covered.sum()) / x.shape[0]


def fast_frechet_distance(real: ArrayLike, fake: ArrayLike, *, device: torch.device | str | None = None) -> float:
    """The value of `frechet_distance` on two feature sets, fast enough for bootstrap loops (float64 throughout).

    With centred features X [n, d], Y [m, d], the covariances are X^T X / (n-1) and Y^T Y / (m-1), and
    tr sqrt(S_x S_y) is the sum of the singular values of X Y^T / sqrt((n-1)(m-1)) (the nonzero eigenvalues of
    S_x S_y are those of (X Y^T)(X Y^T)^T over the same constant). That needs an [n, m] SVD instead of a general
    [d, d] matrix square root; when both sets are larger than d, the symmetric route S_x^1/2 S_y S_x^1/2 is used.
    Both are exact (no eps, no imaginary parts to discard).
    """
    x = _as_tensor(real, "real", torch.float64, device)
    y = _as_tensor(fake, "fake", torch.float64, device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if min(n, m) < 2:
        raise ValueError(f"need at least 2 samples on each side, got real={n}, fake={m}")
    mean_x, mean_y = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - mean_x, y - mean_y
    trace_x, trace_y = (xc * xc).sum() / (n - 1), (yc * yc).sum() / (m - 1)
    if min(n, m) <= d:
        tr_covmean = torch.linalg.svdvals(xc @ yc.T).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        values, vectors = torch.linalg.eigh(xc.T @ xc / (n - 1))
        root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        inner = root @ (yc.T @ yc / (m - 1)) @ root
        tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mean_x - mean_y
    return float(diff @ diff + trace_x + trace_y - 2.0 * tr_covmean)


def mmd2_unbiased(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    real_groups: Sequence[str] | None = None,
    fake_groups: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> float:
    """KID's unbiased MMD² (cubic polynomial kernel) on two whole sets: one estimate, no subsets.

    For the small matched sets of a class the whole-set estimate has the lowest variance; memory is O(n²).
    With ``*_groups`` (e.g. classes) the sets are taken as stratified samples, a fixed count per group: a plain
    within-set U-statistic then under-weights same-group pairs (40 tiles of 9 classes: 10.9 % of the pairs instead
    of 11.1 %), which biases MMD² below zero for equal distributions. Each pair is weighted instead so that every
    (group, group) block carries the product of the groups' shares, as pairs drawn from the mixture would.
    """
    x = _as_tensor(real, "real", torch.float64, device)
    y = _as_tensor(fake, "fake", torch.float64, device)
    if min(x.shape[0], y.shape[0]) < 2:
        raise ValueError(f"MMD² needs at least 2 samples on each side, got real={x.shape[0]}, fake={y.shape[0]}")
    if real_groups is None and fake_groups is None:
        return float(_polynomial_mmd2_unbiased(x, y))
    d = x.shape[1]

    def weights(groups: Sequence[str] | None, n: int) -> tuple[Tensor, Tensor]:
        codes = np.unique(np.asarray(groups if groups is not None else [""] * n), return_inverse=True)[1]
        counts = np.bincount(codes).astype(np.float64)
        share = torch.as_tensor(counts / n, dtype=torch.float64, device=x.device)[codes]
        count = torch.as_tensor(counts, dtype=torch.float64, device=x.device)[codes]
        same = torch.as_tensor(codes[:, None] == codes[None, :], device=x.device)
        pair = share[:, None] * share[None, :] / (count[:, None] * (count[None, :] - same.double()))
        return pair.fill_diagonal_(0.0).nan_to_num_(0.0, posinf=0.0), share / count

    def within(a: Tensor, groups: Sequence[str] | None) -> Tensor:
        pair, _ = weights(groups, a.shape[0])
        return ((a @ a.T / d + 1.0) ** 3 * pair).sum() / pair.sum()

    _, wx = weights(real_groups, x.shape[0])
    _, wy = weights(fake_groups, y.shape[0])
    cross = (((x @ y.T / d + 1.0) ** 3) * wx[:, None] * wy[None, :]).sum()
    return float(within(x, real_groups) + within(y, fake_groups) - 2.0 * cross)

"""Frechet distance between Gaussians fitted to feature sets (the distance behind FID/FVD).

``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``.

Everything is computed in float64 on the CPU: the trace term is a small difference of large
numbers, and float32 loses it for feature dimensions in the hundreds.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_statistics", "frechet_distance", "frechet_from_features"]


def _as_float64(name: str, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Detach, move to the CPU and convert to a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or inf")
    return out


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues (rounding) clip to 0."""
    sym = (matrix + matrix.T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The trace of ``(S1 S2)^1/2`` is computed as the trace of ``(S1^1/2 S2 S1^1/2)^1/2``: the two
    matrices are similar, so their eigenvalues (and traces of square roots) agree, and the second
    one is symmetric PSD whenever S1 and S2 are. A symmetric eigendecomposition of it is therefore
    exact up to rounding, always real, and stable even for rank-deficient covariances (fewer
    samples than dimensions), where the general ``scipy.linalg.sqrtm`` of the non-symmetric
    ``S1 S2`` can return complex parts or fail to converge. Negative rounding residue in the
    eigenvalues is clipped to zero, and a result that rounding made slightly negative becomes 0.
    """
    m1, m2 = _as_float64("mu1", mu1), _as_float64("mu2", mu2)
    s1, s2 = _as_float64("sigma1", sigma1), _as_float64("sigma2", sigma2)
    if m1.ndim != 1 or m2.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors, got shapes {m1.shape} and {m2.shape}")
    d = m1.shape[0]
    if m2.shape[0] != d:
        raise ValueError(f"feature dimensions differ: mu1 has {d}, mu2 has {m2.shape[0]}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {s.shape}")
    s1, s2 = (s1 + s1.T) / 2.0, (s2 + s2.T) / 2.0
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    trace_cross = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_cross)
    return max(value, 0.0)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features`` ``[N, D]``; needs N >= 2."""
    x = _as_float64("features", features)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"features need at least 2 samples (rows) for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def frechet_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``."""
    if np.ndim(a) == 2 and np.ndim(b) == 2 and np.shape(a)[1] != np.shape(b)[1]:
        raise ValueError(f"feature dimensions differ: a is {tuple(np.shape(a))}, b is {tuple(np.shape(b))}")
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    return frechet_distance(mu1, s1, mu2, s2)

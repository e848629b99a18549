"""Tests for the Frechet distance (eval/frechet.py)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.frechet import feature_statistics, frechet_distance, frechet_from_features


def reference_distance(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root of S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A random mean and a well-conditioned random covariance."""
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [1, 2, 8, 64, 128])
def test_matches_scipy_sqrtm_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, s1 = random_gaussian(rng, dim)
    mu2, s2 = random_gaussian(rng, dim)
    expected = reference_distance(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("dim", [4, 32])
def test_matches_reference_on_sample_statistics(dim):
    rng = np.random.default_rng(100 + dim)
    a = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(400, dim)) * 2.0 + 0.5
    mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    expected = reference_distance(mu1, s1, mu2, s2)
    assert frechet_from_features(torch.from_numpy(a).float().double(), b) == pytest.approx(expected, rel=1e-7)


def test_feature_statistics_float64_and_unbiased():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_identical_sets_give_zero():
    x = np.random.default_rng(1).normal(size=(300, 40))
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariance (N < D) is handled too
    y = np.random.default_rng(2).normal(size=(10, 40))
    assert frechet_from_features(y, y) == pytest.approx(0.0, abs=1e-8)


def test_symmetric():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(150, 16)) * 1.5 + 0.3
    assert frechet_from_features(a, b) == pytest.approx(frechet_from_features(b, a), rel=1e-10)


def test_shifted_means_with_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(4)
    mu1, s = random_gaussian(rng, 20)
    shift = rng.normal(size=20)
    got = frechet_distance(mu1, s, mu1 + shift, s)
    assert got == pytest.approx(float(shift @ shift), rel=1e-8)
    # same through features: a shifted copy of a sample set
    x = rng.normal(size=(100, 20))
    assert frechet_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_from_features(np.random.rand(10, 4), np.random.rand(10, 5))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_from_features(np.full((4, 2), np.nan), np.zeros((4, 2)))

"""Independent float64 NumPy references, written plainly from the formulas."""

from __future__ import annotations

import numpy as np


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A (C,) vector shaped to broadcast along ``axis`` of an ``ndim``-dimensional array."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def features_last(a, axis: int) -> np.ndarray:
    """(m, C) float64 view of an array: one column per feature."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def make_data(shape, *, mean=0.0, std=1.0, seed=0) -> np.ndarray:
    """float64 data with a per-feature-independent normal distribution."""
    rng = np.random.default_rng(seed)
    return mean + std * rng.standard_normal(shape)


def reference_moments(x: np.ndarray, axis: int):
    """Batch mean and biased variance per feature, two-pass in float64."""
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    var = ((x - bcast(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    return mean, var


def reference_batch_norm(x, axis=1, weight=None, bias=None, eps=1e-5, mean=None, var=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias; batch statistics unless given."""
    x = np.asarray(x, dtype=np.float64)
    if mean is None:
        mean, var = reference_moments(x, axis)
    y = (x - bcast(mean, x.ndim, axis)) / np.sqrt(bcast(var, x.ndim, axis) + eps)
    if weight is not None:
        y = y * bcast(weight, x.ndim, axis)
    if bias is not None:
        y = y + bcast(bias, x.ndim, axis)
    return y


def reference_backward(x, dy, axis=1, weight=None, eps=1e-5):
    """(dx, dweight, dbias) of training-mode batch norm, from the staged computational graph."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    m = x.size // x.shape[axis % x.ndim]
    mean, var = reference_moments(x, axis)
    mu = bcast(mean, x.ndim, axis)
    xmu = x - mu
    ivar = 1.0 / np.sqrt(bcast(var, x.ndim, axis) + eps)
    xhat = xmu * ivar
    w = 1.0 if weight is None else bcast(weight, x.ndim, axis)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dxhat = dy * w
    # back through xhat = xmu * ivar, ivar = (var + eps)^-1/2, var = mean(xmu^2), xmu = x - mu
    divar = (dxhat * xmu).sum(axis=axes, keepdims=True)
    dxmu1 = dxhat * ivar
    dvar = -0.5 * ivar**3 * divar
    dxmu2 = 2.0 * xmu * dvar / m
    dxmu = dxmu1 + dxmu2
    dmu = -dxmu.sum(axis=axes, keepdims=True)
    dx = dxmu + dmu / m
    return dx, dweight, dbias

"""Per-feature moments of a Dask array as one tree reduction of mergeable moments.

Each chunk gives its (count, mean, M2) in float64; the tree's nodes merge groups of them
with the parallel form of Chan's formula; the root gives the array's (count, mean, M2).
Every task holds one chunk at a time, so memory per worker stays bounded by a few chunks
however large the array, and the result is lazy: it joins the caller's graph.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dask_moments"]


def _chunk(block: Any, axes: tuple[int, ...]) -> dict[str, Any]:
    """One block's (count, mean, M2) per feature, in float64."""
    block = block.astype("float64")
    count = 1
    for a in axes:
        count *= block.shape[a]
    if count == 0:
        zeros = block.sum(axis=axes)
        return {"n": 0, "mean": zeros, "m2": zeros}
    mean = block.mean(axis=axes, keepdims=True)
    centered = block - mean
    m2 = (centered * centered).sum(axis=axes)
    return {"n": count, "mean": mean.reshape(-1), "m2": m2}


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """Chan's formula for many parts at once: exact in any grouping and order."""
    full = [p for p in parts if p["n"] > 0]
    if not full:
        return parts[0]
    n = sum(p["n"] for p in full)
    mean = sum(p["mean"] * (p["n"] / n) for p in full)
    m2 = sum(p["m2"] + (p["mean"] - mean) ** 2 * p["n"] for p in full)
    return {"n": n, "mean": mean, "m2": m2}


def _stacked(part: dict[str, Any]) -> Any:
    import numpy as np

    return np.stack([np.asarray(part["mean"]), np.asarray(part["m2"])])


def dask_moments(x: Any, feature_axis: int, split_every: int = 8) -> tuple[int, Any, Any]:
    """(count, mean, M2) per feature of the Dask array ``x``, lazily, in float64.

    Parameters
    ----------
    x : dask.array.Array, shape (..., C, ...), C along ``feature_axis`` (normalized, >= 0)
    split_every : int, default 8
        The tree's fan-in: each merge task takes this many parts.

    Returns
    -------
    count : int
        Values per feature.
    mean, m2 : dask.array.Array, shape (C,), float64
        Rows of one (2, C) task at the root of the tree.
    """
    import dask
    import dask.array as da
    import numpy as np

    x = x.rechunk({feature_axis: -1})  # every block holds whole features: the tree merges blocks
    axes = tuple(a for a in range(x.ndim) if a != feature_axis)
    count = 1
    for a in axes:
        count *= int(x.shape[a])
    level = [dask.delayed(_chunk)(block, axes) for block in x.to_delayed().ravel()]
    while len(level) > 1:
        level = [dask.delayed(_merge)(*level[i : i + split_every]) for i in range(0, len(level), split_every)]
    c = int(x.shape[feature_axis])
    both = da.from_delayed(dask.delayed(_stacked)(level[0]), shape=(2, c), dtype=np.float64)
    return count, both[0], both[1]

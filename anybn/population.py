"""Population statistics for inference: the paper's estimator and the exact pooled one."""

from __future__ import annotations

from typing import Any, Literal

import array_api_compat

from . import _fast
from ._checks import check_axis, check_num_features
from ._layout import layout_of
from ._moments import BatchMoments, merge_moments
from ._namespace import (
    Array,
    Namespace,
    accumulation_dtype,
    compute_dtype,
    describe,
    library_name,
    namespace_of,
    PortableState,
)
from ._saved import BatchNormSaved
from ._steps import Stats, stats_from_sums

__all__ = ["PopulationStats"]

Method = Literal["paper", "pooled"]


class PopulationStats(PortableState):
    """Per-feature population mean and variance, accumulated one batch at a time.

    Two estimates come out of the same pass over the data:

    ``"paper"``
        Algorithm 2 of Ioffe & Szegedy (2015): E[x] is the average of the batch means and
        Var[x] = m / (m - 1) * the average of the biased batch variances, m being the
        number of values per feature in a batch. For batches of unequal sizes m_i the
        averages are weighted by information: E[x] = sum(m_i * mean_i) / sum(m_i) and
        Var[x] = sum(m_i * var_i) / sum(m_i - 1), the pooled within-batch variance. Each
        batch's unbiased variance m_i / (m_i - 1) * var_i enters with weight m_i - 1, its
        degrees of freedom; with equal sizes both reduce to the paper's formulas. The
        estimate leaves out the spread between batch means, as the paper does.
    ``"pooled"``
        The exact mean and unbiased variance of every value seen, as if all batches were
        concatenated, merged with Chan's parallel formula: batch order and sizes do not
        matter.

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis of every batch.
    axis : int, default 1
        The feature axis of the batches (-1 for channels-last).
    comm : anybn.distributed.Communicator, optional
        Data-parallel estimation: every rank adds its own batches, and :meth:`result`
        (called on every rank) merges all ranks' moments exactly (two collectives) and
        returns the same estimate on every rank. A rank may have seen no batch. Leave it
        None when feeding :meth:`update_from` with synchronized forward passes: their
        statistics are already global.

    Notes
    -----
    Statistics are accumulated in float64 where the backend offers it on the batches'
    device, else in float32. Results come back in the batches' compute dtype (float32 for
    float16/bfloat16 batches) in their namespace and on their device.
    """

    def __init__(self, num_features: int, *, axis: int = 1, comm: Any = None) -> None:
        self.num_features = check_num_features("PopulationStats", num_features)
        self.axis = check_axis("PopulationStats", axis)
        self.comm = comm
        self._xp: Any = None
        self._device: Any = None
        self._dtype: Any = None
        self._batches = 0
        self._total: BatchMoments | None = None  # all values, merged exactly
        self._within_m2: Array | None = None  # sum over batches of m_i * var_i

    @property
    def num_batches(self) -> int:
        """Number of batches seen by :meth:`update`."""
        return self._batches

    @property
    def count(self) -> int:
        """Number of values seen per feature."""
        return 0 if self._total is None else self._total.count

    def update(self, x: Array) -> PopulationStats:
        """Add one batch. ``x`` has the layout given by ``axis`` and ``num_features`` features.

        One pass over x through the training forward's reductions (a fast path's kernels
        where one serves x). A Dask array takes a tree reduction of per-chunk mergeable
        moments instead, lazily: the batches and :meth:`result` form one graph, which a
        ``dask.distributed`` cluster runs with a few chunks per worker in memory. Returns
        ``self``. All batches must share one namespace and device.
        """
        fn = "PopulationStats.update"
        if x is None:
            raise TypeError(f"{fn}: x must be an array of an array-API library, got None")
        xp = namespace_of(fn, x=x)
        layout = layout_of(fn, xp, x, self.axis)
        if layout.features != self.num_features:
            raise ValueError(
                f"{fn}: x has {layout.features} features along axis {self.axis} "
                f"(x.shape = {layout.shape}), expected num_features = {self.num_features}"
            )
        self._check_same_library(fn, xp, x)
        if layout.per_feature < 1:
            raise ValueError(f"{fn}: x has no values per feature (x.shape = {layout.shape})")
        if array_api_compat.is_dask_array(x):
            # one tree reduction of per-chunk (count, mean, M2): bounded memory per worker, lazy
            from .distributed._dask import dask_moments

            count, mean, m2 = dask_moments(x, layout.axis)
            self._add(xp, x, Stats(count, mean, xp.zeros_like(mean), m2 / count))
            return self
        kernels = _fast.kernels_for("train", xp, x)
        stats = stats_from_sums(xp, kernels.moments(xp, x, layout))
        self._add(xp, x, stats)
        return self

    def update_from(self, saved: BatchNormSaved) -> PopulationStats:
        """Add the batch a training forward pass normalized, from its ``saved`` statistics.

        No pass over the data: ``saved`` (from :func:`anybn.batch_norm_train`) holds the
        batch's count, mean (as pivot + delta) and biased variance. This is how a layer feeds
        its population statistics during a forward pass. Returns ``self``.
        """
        fn = "PopulationStats.update_from"
        if not isinstance(saved, BatchNormSaved) or not saved.batch_stats or saved.pivot is None:
            raise TypeError(
                f"{fn}: saved must be the BatchNormSaved of a training forward pass "
                f"(batch_norm_train), got {type(saved).__name__}"
            )
        if saved.mean.shape[0] != self.num_features:
            raise ValueError(
                f"{fn}: saved has {saved.mean.shape[0]} features, expected num_features = "
                f"{self.num_features}"
            )
        xp = namespace_of(fn, x=saved.x)
        self._check_same_library(fn, xp, saved.x)
        if saved.comm is None:
            self._add(xp, saved.x, Stats(saved.count, saved.pivot, saved.delta, saved.var))
            return self
        if self.comm is not None:
            raise ValueError(
                f"{fn}: saved holds global statistics (a synchronized forward pass, comm=...), and this "
                f"PopulationStats merges across ranks too (comm=...): they would be counted once per "
                f"rank; create the PopulationStats without comm"
            )
        # global statistics, bitwise the same on every rank: keep them so (mean as it is)
        self._add(xp, saved.x, Stats(saved.count, saved.mean, xp.zeros_like(saved.mean), saved.var))
        return self

    def _check_same_library(self, fn: str, xp: Namespace, x: Array) -> None:
        device = array_api_compat.device(x)
        if self._xp is None:
            return
        if xp is not self._xp or device != self._device:
            raise TypeError(
                f"{fn}: x is a {describe(x)} array on {device!r}, expected the library and device "
                f"of the first batch ({library_name(self._xp)} on {self._device!r})"
            )

    def _add(self, xp: Namespace, x: Array, stats: Stats) -> None:
        if self._xp is None:
            self._xp, self._device = xp, array_api_compat.device(x)
            self._dtype = compute_dtype(xp, x.dtype)
        acc = accumulation_dtype(xp, self._device, self._dtype)
        mean = xp.astype(stats.pivot, acc) + xp.astype(stats.delta, acc)
        m2 = xp.astype(stats.var, acc) * stats.count
        batch = BatchMoments(stats.count, mean, m2)
        if self._total is None:
            self._total, self._within_m2 = batch, m2
        else:
            self._total = merge_moments(self._total, batch)
            self._within_m2 = self._within_m2 + m2
        self._batches += 1

    def result(self, method: Method = "paper") -> tuple[Array, Array]:
        """The population (mean, var), each of shape (C,).

        Parameters
        ----------
        method : {"paper", "pooled"}, default "paper"
            See the class docstring.

        Returns
        -------
        mean, var : array, shape (C,)
            ``var`` is unbiased in both methods.
        """
        fn = "PopulationStats.result"
        if method not in ("paper", "pooled"):
            raise ValueError(f"{fn}: method must be 'paper' or 'pooled', got {method!r}")
        if self.comm is not None:
            xp, total, within_m2, batches = self._merged_over_ranks(fn)
        elif self._total is None:
            raise ValueError(f"{fn}: no batch has been added; call update(x) first")
        else:
            xp, total, within_m2, batches = self._xp, self._total, self._within_m2, self._batches
        if method == "paper":
            dof = total.count - batches
            if dof < 1:
                raise ValueError(
                    f"{fn}: method 'paper' needs a batch with more than 1 value per feature, "
                    f"got {batches} batch(es) of {total.count} value(s) in all"
                )
            assert within_m2 is not None
            var = within_m2 / dof
        else:
            if total.count < 2:
                raise ValueError(
                    f"{fn}: method 'pooled' needs more than 1 value per feature, got {total.count}"
                )
            var = total.m2 / (total.count - 1)
        dtype = self._dtype if self._dtype is not None else xp.float64
        return xp.astype(total.mean, dtype), xp.astype(var, dtype)

    def _merged_over_ranks(self, fn: str) -> tuple[Namespace, BatchMoments, Array, int]:
        """Every rank's moments, merged in rank order (the same on every rank)."""
        from .distributed import _sync

        acc = None if self._xp is None else accumulation_dtype(self._xp, self._device, self._dtype)
        total, within, batches, xp = _sync.merge_population(
            fn, self.comm, self._xp, self._total, self._within_m2, self._batches, self.num_features, acc,
            self._device,
        )
        return xp, total, within, batches

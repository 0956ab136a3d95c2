"""Population statistics for inference: the paper's estimator and the exact pooled one."""

from __future__ import annotations

from typing import Any, Literal

import array_api_compat

from ._moments import BatchMoments, FeatureReducer, merge_moments, shifted_moments
from ._namespace import (
    Array,
    accumulation_dtype,
    check_axis_type,
    check_num_features,
    compute_dtype,
    describe,
    layout_of,
    namespace_of,
)

__all__ = ["PopulationStats"]

Method = Literal["paper", "pooled"]


class PopulationStats:
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

    Notes
    -----
    Statistics are accumulated in float64 where the backend offers it on the batches'
    device, else in float32. Results come back in the batches' compute dtype (float32 for
    float16/bfloat16 batches) in their namespace and on their device.
    """

    def __init__(self, num_features: int, *, axis: int = 1) -> None:
        check_num_features("PopulationStats", num_features)
        check_axis_type("PopulationStats", axis)
        self.num_features = num_features
        self.axis = axis
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

        Returns ``self``. All batches must share one namespace and device.
        """
        fn = "PopulationStats.update"
        xp = namespace_of(fn, x=x)
        layout = layout_of(fn, xp, x, self.axis)
        if layout.features != self.num_features:
            raise ValueError(
                f"{fn}: x has {layout.features} features along axis {self.axis} "
                f"(x.shape = {layout.shape}), expected num_features = {self.num_features}"
            )
        device = array_api_compat.device(x)
        if self._xp is None:
            self._xp, self._device = xp, device
            self._dtype = compute_dtype(xp, x.dtype)
        elif xp is not self._xp or device != self._device:
            raise TypeError(
                f"{fn}: x is a {describe(x)} array on {device!r}, expected the library and "
                f"device of the first batch ({self._device!r})"
            )
        if layout.per_feature < 1:
            raise ValueError(f"{fn}: x has no values per feature (x.shape = {layout.shape})")

        cdt = compute_dtype(xp, x.dtype)
        acc = accumulation_dtype(xp, device, self._dtype)
        reducer = FeatureReducer(xp, layout, cdt, device)
        xf = xp.reshape(x if x.dtype == cdt else xp.astype(x, cdt), layout.folded_shape)
        _, pivot, delta, var = shifted_moments(reducer, xf)
        mean = xp.astype(pivot, acc) + xp.astype(delta, acc)
        m2 = xp.astype(var, acc) * layout.per_feature
        batch = BatchMoments(layout.per_feature, mean, m2)

        if self._total is None:
            self._total, self._within_m2 = batch, m2
        else:
            self._total = merge_moments(self._total, batch)
            self._within_m2 = self._within_m2 + m2
        self._batches += 1
        return self

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
        if self._total is None:
            raise ValueError(f"{fn}: no batch has been added; call update(x) first")
        xp, total = self._xp, self._total
        if method == "paper":
            dof = total.count - self._batches
            if dof < 1:
                raise ValueError(
                    f"{fn}: method 'paper' needs a batch with more than 1 value per feature, "
                    f"got {self._batches} batch(es) of {total.count} value(s) in all"
                )
            assert self._within_m2 is not None
            var = self._within_m2 / dof
        else:
            if total.count < 2:
                raise ValueError(
                    f"{fn}: method 'pooled' needs more than 1 value per feature, got {total.count}"
                )
            var = total.m2 / (total.count - 1)
        return xp.astype(total.mean, self._dtype), xp.astype(var, self._dtype)

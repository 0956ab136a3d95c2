"""Batch renormalization (Ioffe 2017): batch statistics corrected towards the running ones.

Only the coefficients stage differs from batch normalization. With the batch's
sigma_B = sqrt(var_B + eps) and the running sigma = sqrt(running_var + eps),

    r = clip(sigma_B / sigma, 1 / rmax, rmax),    d = clip((mu_B - mu) / sigma, -dmax, dmax),
    y = weight * (x-hat * r + d) + bias,

which is the apply's y = (x - pivot) * scale + shift with scale = weight * invstd * r and
shift = weight * (d - delta * invstd * r) + bias. r and d are constants in backward: dx is
batch normalization's with the weight scaled by r, and dweight = sum(dy * (x-hat * r + d))
(``anybn._steps.backward_coefficients``). With rmax = 1 and dmax = 0, r = 1 and d = 0: plain
batch normalization.
"""

from __future__ import annotations

from typing import Any

from . import _fast
from ._checks import check_real
from ._namespace import Array, Namespace, compute_dtype
from ._saved import BatchNormSaved
from ._steps import stats_from_sums, train_coefficients
from .functional import _batch_saved, _validated, batch_norm_train
from .layer import BatchNorm

__all__ = ["BatchRenorm", "batch_renorm_train", "renorm_limits"]


def _as(xp: Namespace, a: Array | None, dtype: Any) -> Array | None:
    if a is None or a.dtype == dtype:
        return a
    return xp.astype(a, dtype)


def check_limits(fn: str, rmax: Any, dmax: Any) -> tuple[float, float]:
    """``rmax >= 1`` and ``dmax >= 0`` as floats (finite or inf)."""
    rmax = check_real(fn, "rmax", rmax, "a float >= 1")
    dmax = check_real(fn, "dmax", dmax, "a float >= 0")
    if not rmax >= 1.0:  # also rejects nan
        raise ValueError(f"{fn}: rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}")
    if not dmax >= 0.0:
        raise ValueError(f"{fn}: dmax must be >= 0 (d is clipped to [-dmax, dmax]), got {dmax}")
    return rmax, dmax


def batch_renorm_train(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    *,
    rmax: float,
    dmax: float,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, BatchNormSaved]:
    """Batch renormalization in training mode (Ioffe 2017, Algorithm 1).

    y = weight * (x-hat * r + d) + bias, where x-hat uses the batch mean and biased
    variance, r = clip(sigma_B / sigma, 1/rmax, rmax) and d = clip((mu_B - mu) / sigma,
    -dmax, dmax), with sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps) and
    mu = running_mean. :func:`anybn.batch_norm_backward` on ``saved`` treats r and d as
    constants, as the paper prescribes. ``rmax=1, dmax=0`` is batch normalization exactly.

    Parameters
    ----------
    x : array, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
        Any array-API array of a real floating dtype, with at least two values per feature.
    weight, bias : array of shape (C,) or None
        Scale (gamma) and shift (beta), in the namespace and on the device of ``x``.
    running_mean, running_var : array, shape (C,)
        The running statistics (mu and sigma**2 - eps of the paper), required. They are not
        modified: update them with :func:`anybn.update_running_stats` on ``saved``.
    rmax : float >= 1
        Bound of r; 1 keeps r = 1.
    dmax : float >= 0
        Bound of d; 0 keeps d = 0.
    axis : int, default 1
        The feature axis.
    eps : float, default 1e-5
        Added to both variances; must be finite and > 0.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    saved : BatchNormSaved
        As from :func:`anybn.batch_norm_train` (batch mean and variance, for the running
        statistics), with ``r`` and ``d`` of shape (C,) in the compute dtype; with
        ``rmax=1, dmax=0`` it is :func:`anybn.batch_norm_train`'s own (``r = d = None``).
    """
    fn = "batch_renorm_train"
    rmax, dmax = check_limits(fn, rmax, dmax)
    xp, layout, eps = _validated(fn, x, axis, eps, ("running_mean", "running_var"), weight=weight,
                                 bias=bias, running_mean=running_mean, running_var=running_var)
    if layout.per_feature < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per feature when training, got x.shape = "
            f"{layout.shape} ({layout.per_feature} value(s) per feature along axis {layout.axis})"
        )
    if rmax == 1.0 and dmax == 0.0:  # r = 1, d = 0: batch normalization, the very same call
        return batch_norm_train(x, weight, bias, axis=axis, eps=eps)
    kernels = _fast.kernels_for("train", xp, x)  # the stages only: no whole-step shortcut
    # reductions
    sums = kernels.moments(xp, x, layout)
    # coefficients: batch normalization's, with weight * r, and weight * d added to the shift
    stats = stats_from_sums(xp, sums)
    dtype = stats.var.dtype
    r, d = _correction(xp, stats.pivot + stats.delta, stats.var, _as(xp, running_mean, dtype),
                       _as(xp, running_var, dtype), rmax, dmax, eps)
    w = _as(xp, weight, dtype)
    coef = train_coefficients(xp, stats, r if w is None else w * r, bias, eps)
    shift = coef.shift + (d if w is None else w * d)
    # apply
    y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, shift, scratch=sums.scratch)

    saved = _batch_saved(xp, x, layout, stats, coef, weight, bias, eps)
    cdt = compute_dtype(xp, x.dtype)
    saved.r, saved.d = _as(xp, r, cdt), _as(xp, d, cdt)
    return y, saved


def _correction(
    xp: Namespace, mean: Array, var: Array, running_mean: Array, running_var: Array, rmax: float,
    dmax: float, eps: float,
) -> tuple[Array, Array]:
    """r = clip(sigma_B / sigma, 1/rmax, rmax) and d = clip((mu_B - mu) / sigma, -dmax, dmax)."""
    sigma = xp.sqrt(running_var + eps)
    r = xp.clip(xp.sqrt(var + eps) / sigma, 1.0 / rmax, rmax)
    d = xp.clip((mean - running_mean) / sigma, -dmax, dmax)
    return r, d


def renorm_limits(
    step: int,
    *,
    warmup: int = 5000,
    rmax: float = 3.0,
    dmax: float = 5.0,
    rmax_step: int = 40000,
    dmax_step: int = 25000,
) -> tuple[float, float]:
    """The (rmax, dmax) of training step ``step``, as in the paper's experiments.

    rmax = 1 and dmax = 0 (batch normalization) for the first ``warmup`` steps, then both
    relaxed linearly, reaching ``rmax`` at step ``rmax_step`` and ``dmax`` at ``dmax_step``
    (Ioffe 2017, section 4.1: 5000, 40k and 25k steps, 3 and 5).

    Parameters
    ----------
    step : int >= 0
        The number of training steps taken so far.
    warmup, rmax_step, dmax_step : int
        Steps; ``warmup <= rmax_step`` and ``warmup <= dmax_step``.
    rmax, dmax : float
        The final limits, ``rmax >= 1`` and ``dmax >= 0``.

    Returns
    -------
    rmax, dmax : float
        For :func:`batch_renorm_train` or :class:`BatchRenorm` at this step.
    """
    fn = "renorm_limits"
    rmax, dmax = check_limits(fn, rmax, dmax)
    step_f = check_real(fn, "step", step, "an int >= 0")
    if step_f < 0:
        raise ValueError(f"{fn}: step must be >= 0, got {step}")
    for name, end in (("rmax_step", rmax_step), ("dmax_step", dmax_step)):
        if check_real(fn, name, end, "an int") < check_real(fn, "warmup", warmup, "an int >= 0"):
            raise ValueError(f"{fn}: {name} must be >= warmup = {warmup}, got {end}")
    return (_ramp(step_f, warmup, rmax_step, 1.0, rmax), _ramp(step_f, warmup, dmax_step, 0.0, dmax))


def _ramp(step: float, start: int, stop: int, low: float, high: float) -> float:
    if step <= start:
        return low
    if step >= stop:
        return high
    return low + (high - low) * (step - start) / (stop - start)


class BatchRenorm(BatchNorm):
    """Batch renormalization layer (Ioffe 2017): :class:`anybn.BatchNorm` with r and d.

    In training mode ``layer(x)`` normalizes with :func:`batch_renorm_train` (batch
    statistics corrected towards the running ones) and updates the running statistics as
    :class:`anybn.BatchNorm` does; eval mode is batch normalization's, with the running
    statistics. Set ``rmax`` and ``dmax`` at every step for a schedule
    (:func:`renorm_limits`).

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis.
    rmax : float >= 1, default 3.0
        Bound of r.
    dmax : float >= 0, default 5.0
        Bound of d.
    momentum : float in (0, 1], default 0.01
        Weight of the new batch in the running averages (PyTorch's convention: tf-keras's
        ``renorm_momentum=0.99`` is 0.01 here). Renormalization uses the running statistics
        in training, so they must follow the batches closely enough; the paper's alpha.
    axis, eps, affine, xp, device, dtype
        As for :class:`anybn.BatchNorm`; the running statistics are always tracked.

    Attributes
    ----------
    rmax, dmax : float
        The current limits; assign them to follow a schedule.
    weight, bias, running_mean, running_var, num_batches_tracked, grad_weight, grad_bias, training
        As for :class:`anybn.BatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        momentum: float = 0.01,
        axis: int = 1,
        eps: float = 1e-5,
        affine: bool = True,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        fn = "BatchRenorm"
        self._rmax, self._dmax = check_limits(fn, rmax, dmax)
        if momentum is None:
            raise ValueError(f"{fn}: momentum must be a float in (0, 1], got None (a cumulative average "
                             "would stop following the network as it trains)")
        super().__init__(num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, xp=xp, device=device, dtype=dtype)

    @property
    def rmax(self) -> float:
        """Bound of r, >= 1."""
        return self._rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        self._rmax, _ = check_limits("BatchRenorm.rmax", value, 0.0)

    @property
    def dmax(self) -> float:
        """Bound of d, >= 0."""
        return self._dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        _, self._dmax = check_limits("BatchRenorm.dmax", 1.0, value)

    def forward(self, x: Array, residual: Array | None = None) -> Array:
        """Renormalize ``x`` in training mode, normalize with running statistics in eval mode."""
        if not self.training or self.population is not None or getattr(self, "frozen", False):
            return super().forward(x, residual)
        if residual is not None or getattr(self, "activation", None) is not None:
            raise ValueError("BatchRenorm: activation= and residual= are not available in training mode")
        self._check_input(x)
        assert self.running_mean is not None and self.running_var is not None
        y, saved = batch_renorm_train(x, self.weight, self.bias, self.running_mean, self.running_var,
                                      rmax=self._rmax, dmax=self._dmax, axis=self.axis, eps=self.eps)
        self._track(saved)
        self._saved = saved
        return y

    def __repr__(self) -> str:
        return (
            f"BatchRenorm({self.num_features}, rmax={self._rmax}, dmax={self._dmax}, axis={self.axis}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine})"
        )

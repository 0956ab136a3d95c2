"""Recurrent batch normalization (Cooijmans et al. 2016): statistics per time step.

An RNN applies the same layer at every time step, but the activations' statistics change
over the first steps (the state starts at zero). :class:`RecurrentBatchNorm` keeps one row
of running statistics per step, shares weight and bias across steps, and initialises the
weight to 0.1, which the paper found keeps the tanh/sigmoid gates out of saturation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import interop
from ._checks import _integer
from ._namespace import Array
from ._saved import BatchNormSaved
from .functional import _fixed, batch_norm_backward, batch_norm_train, update_running_stats
from .layer import BatchNorm
from .population import Method, PopulationStats

__all__ = ["RecurrentBatchNorm"]


class RecurrentBatchNorm(BatchNorm):
    """Batch normalization with running statistics per time step, called as ``layer(x, step=t)``.

    Training normalizes with the batch statistics and updates row ``min(t, max_steps - 1)``
    of the running statistics; eval normalizes with that row. Steps at or beyond
    ``max_steps`` share the last row (the paper's "statistics of the last step
    generalize to longer sequences"). ``weight`` and ``bias`` are shared by all steps.

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis.
    max_steps : int
        Rows of running statistics (the training sequence length, T_max in the paper).
    axis : int, default 1
        Feature axis of the inputs (``(N, C)`` for an RNN's pre-activations).
    eps : float, default 1e-5
    momentum : float in [0, 1], default 0.1
        Weight of the new batch in its step's running averages.
    affine : bool, default True
        Learn ``weight`` (initialised to ``weight_init``) and ``bias`` (to 0).
    weight_init : float, default 0.1
        The initial gamma; the paper recommends 0.1.
    xp, device, dtype
        As for :class:`anybn.BatchNorm`.

    Attributes
    ----------
    running_mean, running_var : array of shape (max_steps, C)
    weight, bias : array of shape (C,) or None
    grad_weight, grad_bias : array of shape (C,) or None
        Summed over the :meth:`backward` calls since the last :meth:`zero_grad`: a sequence's
        steps share the parameters, so their gradients add up (backpropagation through time).
    num_batches_tracked : int
        Training forward calls, all steps together.
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        weight_init: float = 0.1,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        fn = "RecurrentBatchNorm"
        steps = _integer(fn, "max_steps", max_steps, "a positive int")
        if steps < 1:
            raise ValueError(f"{fn}: max_steps must be a positive int, got {steps}")
        if momentum is None:
            raise ValueError(f"{fn}: momentum must be a float in [0, 1], got None (no cumulative average per step)")
        self.max_steps = steps
        self.weight_init = float(weight_init)
        self._steps_saved: dict[int, BatchNormSaved] = {}
        super().__init__(num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, xp=xp, device=device, dtype=dtype)

    def reset_running_stats(self) -> None:
        """Running means 0 and variances 1 for every step; no batches tracked."""
        shape = (self.max_steps, self.num_features)
        self.running_mean = self._xp.zeros(shape, dtype=self._dtype, device=self._device)
        self.running_var = self._xp.ones(shape, dtype=self._dtype, device=self._device)
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics; weight to ``weight_init`` and bias to 0 when affine."""
        self.reset_running_stats()
        if self.affine:
            self.weight = self._full(self.weight_init)
            self.bias = self._full(0.0)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Forget the accumulated ``grad_weight`` and ``grad_bias``, and the saved steps."""
        self.grad_weight = self.grad_bias = None
        self._steps_saved = {}

    def _row(self, fn: str, step: Any) -> tuple[int, int]:
        t = _integer(fn, "step", step, "an int >= 0")
        if t < 0:
            raise ValueError(f"{fn}: step must be an int >= 0, got {t}")
        return t, min(t, self.max_steps - 1)

    def __call__(self, x: Array, step: int = 0) -> Array:  # type: ignore[override]
        """Forward pass at time step ``step``; see :meth:`forward`."""
        return self.forward(x, step=step)

    def forward(self, x: Array, step: int = 0) -> Array:  # type: ignore[override]
        """Normalize ``x`` at time step ``step`` (an int >= 0).

        Returns an array of the shape, dtype, namespace and device of ``x``. In training
        mode, also updates the running statistics of the step's row.
        """
        t, row = self._row("RecurrentBatchNorm.forward", step)
        self._check_input(x)
        assert self.running_mean is not None and self.running_var is not None
        mean, var = self.running_mean[row, ...], self.running_var[row, ...]
        if self.training and not self.frozen:
            y, saved = batch_norm_train(x, self.weight, self.bias, axis=self.axis, eps=self.eps)
            self.num_batches_tracked += 1
            new_mean, new_var = update_running_stats(mean, var, saved, momentum=self.momentum)
            self.running_mean = self._with_row(self.running_mean, row, new_mean)
            self.running_var = self._with_row(self.running_var, row, new_var)
        else:
            y, fixed = _fixed("RecurrentBatchNorm", x, mean, var, self.weight, self.bias, axis=self.axis,
                              eps=self.eps)
            assert fixed is not None
            saved = fixed
        self._saved = saved
        self._steps_saved[t] = saved
        return y

    def _with_row(self, table: Array, row: int, values: Array) -> Array:
        """A new (max_steps, C) table with ``row`` replaced (no in-place write: JAX, shared dicts)."""
        xp = self._xp
        mask = xp.reshape(xp.arange(self.max_steps, device=self._device) == row, (self.max_steps, 1))
        return xp.where(mask, xp.reshape(values, (1, self.num_features)), table)

    def backward(self, dy: Array, step: int | None = None) -> Array:  # type: ignore[override]
        """Gradient with respect to the input of the forward pass at ``step``.

        ``step=None`` takes the last forward pass. Adds this step's parameter gradients to
        ``grad_weight`` and ``grad_bias``; returns ``dx``.
        """
        fn = "RecurrentBatchNorm.backward"
        if step is None:
            saved = self._saved
        else:
            t, _ = self._row(fn, step)
            saved = self._steps_saved.get(t)
        if saved is None:
            raise ValueError(f"{fn}: no forward pass at step {step} to differentiate (steps seen: "
                             f"{sorted(self._steps_saved)}); call layer(x, step=t) first")
        dx, dw, db = batch_norm_backward(dy, saved)
        if dw is not None:
            self.grad_weight = dw if self.grad_weight is None else self.grad_weight + dw
        if db is not None:
            self.grad_bias = db if self.grad_bias is None else self.grad_bias + db
        return dx

    def estimate_population(self, batches: Iterable[Array] | PopulationStats,
                            method: Method = "paper") -> BatchNorm:
        """Not available per step: raises TypeError."""
        raise TypeError("RecurrentBatchNorm.estimate_population: population statistics are not kept per "
                        "step; train with the running averages")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state saved by ``state_dict()``: running statistics of shape (max_steps, C)."""
        fn = "RecurrentBatchNorm.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{fn}: state must be a mapping of names to arrays, got {type(state).__name__}")
        expected = set(self._state_keys())
        if set(state) != expected:
            raise ValueError(f"{fn}: state keys do not match: got {sorted(state)}, expected {sorted(expected)}")
        converted: dict[str, Any] = {}
        for key in expected:
            if key == "num_batches_tracked":
                converted[key] = interop.as_count(fn, state[key])
                continue
            value = interop.to_namespace(fn, key, state[key], self._xp, self._device, self._dtype)
            shape = (self.max_steps, self.num_features) if key.startswith("running") else (self.num_features,)
            if tuple(value.shape) != shape:
                raise ValueError(f"{fn}: {key} has shape {tuple(value.shape)}, expected {shape}")
            converted[key] = value
        for key, value in converted.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (f"RecurrentBatchNorm({self.num_features}, {self.max_steps}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine})")

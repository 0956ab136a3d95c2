"""The stateful layer: parameters and running statistics around the functional core."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import array_api_compat

from . import interop
from ._checks import check_axis, check_eps, check_momentum, check_num_features, check_real
from ._namespace import Array, PortableState, describe, library_name, namespace_from_module, namespace_of
from ._kernels import ACTIVATIONS
from ._saved import BatchNormSaved
from .functional import _fixed, _train_synchronized, batch_norm_backward, batch_norm_train, update_running_stats
from .population import Method, PopulationStats

__all__ = ["BatchNorm"]


class BatchNorm(PortableState):
    """Batch normalization layer with PyTorch's semantics, on any array-API backend.

    In training mode (the default) ``layer(x)`` normalizes with the batch statistics and
    updates the running statistics; in eval mode it uses the running statistics.

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis.
    axis : int, default 1
        Feature axis of the inputs: 1 for ``(N, C, *spatial)``, -1 for channels-last.
    eps : float, default 1e-5
        Added to the variance; must be > 0.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running averages:
        running = (1 - momentum) * running + momentum * batch. None gives the cumulative
        average over all batches (factor 1 / num_batches_tracked).
    affine : bool, default True
        Learn ``weight`` (gamma, initialised to 1) and ``bias`` (beta, initialised to 0).
    track_running_stats : bool, default True
        Keep running statistics. When False, batch statistics are used in eval mode too,
        and ``running_mean``/``running_var`` are None.
    xp : module, optional
        The array library of the parameters (numpy, cupy, torch, jax.numpy, ...).
        Defaults to NumPy. Inputs must come from the same library and device.
    device : optional
        Device for the parameters, in ``xp``'s terms.
    dtype : optional
        Real floating dtype of the parameters (an ``xp`` dtype or its name); float32 by
        default. float16/bfloat16 inputs pair well with float32 parameters.
    virtual_batch_size : int, optional
        Ghost batch normalization in training mode: chunks of this many samples along axis
        0 are normalized with their own statistics (see :func:`anybn.batch_norm_train`); the
        running statistics are updated once per call, with the chunks' mean of means and
        mean of unbiased variances. Eval mode is unchanged. None: the whole batch.
    comm : anybn.distributed.Communicator, optional
        Synchronized batch normalization (data-parallel training): each rank's input is its
        slice of the global batch, and training-mode forward passes normalize with the
        statistics of the global batch (see :func:`anybn.batch_norm_train`). The running
        statistics are then bitwise the same on every rank. ``grad_weight`` and
        ``grad_bias`` are this rank's own contribution: sum them over ranks (the usual
        data-parallel gradient all-reduce) for the global gradient, as with PyTorch's
        ``SyncBatchNorm``. Eval mode makes no collective. Settable later, or through
        :func:`anybn.distributed.synchronize`.
    activation : {None, "relu", "sigmoid"}, default None
        A fused activation: the layer returns act(BN(x) [+ residual]) from one pass, and
        :meth:`backward` takes the gradient of that output (BN-add-ReLU as cuDNN fuses
        it). Not available with ``comm`` or ``virtual_batch_size`` yet.

    Attributes
    ----------
    weight, bias : array of shape (C,) or None
    running_mean, running_var : array of shape (C,) or None
        ``running_var`` is updated with the unbiased batch variance, as PyTorch, Chainer
        and cuDNN do, while normalization uses the biased one.
    num_batches_tracked : int
    grad_weight, grad_bias : array of shape (C,) or None
        Set by :meth:`backward`.
    grad_residual : array or None
        Set by :meth:`backward` when the forward pass was given a residual.
    training : bool
    frozen : bool
        Set by :meth:`freeze`: normalize with the running statistics in every mode, never
        update them. :meth:`train` leaves it alone.
    population : PopulationStats or None
        When set, every forward pass normalizes with the batch statistics and adds them to
        this :class:`PopulationStats` (no extra pass over the data), leaving the running
        statistics alone; then :meth:`estimate_population` takes it. A deep network collects
        every layer's population statistics in one pass over the data this way.
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
        virtual_batch_size: int | None = None,
        comm: Any = None,
        activation: str | None = None,
    ) -> None:
        fn = "BatchNorm"
        if activation not in ACTIVATIONS:
            raise ValueError(f"{fn}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation: str | None = activation
        self.num_features = check_num_features(fn, num_features)
        if virtual_batch_size is not None:
            from ._checks import _integer

            virtual_batch_size = _integer(fn, "virtual_batch_size", virtual_batch_size, "a positive int or None")
            if virtual_batch_size < 1:
                raise ValueError(f"{fn}: virtual_batch_size must be a positive int or None, got {virtual_batch_size}")
        self.virtual_batch_size: int | None = virtual_batch_size
        self.comm: Any = comm
        self.frozen = False
        self.axis = check_axis(fn, axis)
        self.eps = check_eps(fn, eps)
        self.momentum = check_momentum(fn, momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.training = True

        self._xp = namespace_from_module(xp)
        self._dtype = self._resolve_dtype(dtype)
        self._device = device
        # validate the device by making the first parameter on it
        probe = self._xp.zeros(num_features, dtype=self._dtype, device=device)
        self._device = array_api_compat.device(probe)

        self.weight: Array | None = None
        self.bias: Array | None = None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked = 0
        self.grad_weight: Array | None = None
        self.grad_bias: Array | None = None
        self.grad_residual: Array | None = None
        self._saved: BatchNormSaved | None = None
        self.population: PopulationStats | None = None
        self.reset_parameters()

    # -- set-up -------------------------------------------------------------------------

    def _resolve_dtype(self, dtype: Any) -> Any:
        xp = self._xp
        if dtype is None:
            return xp.float32
        if isinstance(dtype, str):
            resolved = getattr(xp, dtype, None)
            if resolved is None:
                raise TypeError(f"BatchNorm: dtype {dtype!r} is not a dtype of {library_name(xp)}")
            dtype = resolved
        try:
            floating = xp.isdtype(dtype, "real floating")
        except Exception:
            floating = False
        if not floating:
            raise TypeError(f"BatchNorm: dtype must be a real floating dtype, got {dtype!r}")
        return dtype

    def _full(self, value: float) -> Array:
        return self._xp.full(self.num_features, value, dtype=self._dtype, device=self._device)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            self.running_mean = self._full(0.0)
            self.running_var = self._full(1.0)
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, and weight to 1 and bias to 0 when affine."""
        self.reset_running_stats()
        if self.affine:
            self.weight = self._full(1.0)
            self.bias = self._full(0.0)

    # -- modes --------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=True``) or eval mode; returns ``self``."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode; returns ``self``."""
        return self.train(False)

    def freeze(self) -> BatchNorm:
        """Freeze the statistics (fine-tuning); returns ``self``.

        A frozen layer normalizes with its running statistics in training mode too, never
        updates them, and its backward treats them as constants: dx = dy * weight /
        sqrt(running_var + eps), while ``grad_weight`` and ``grad_bias`` are still set.
        :meth:`train` and :meth:`eval` do not undo it (unlike PyTorch's ``bn.eval()`` trick,
        which ``model.train()`` silently reverts); :meth:`unfreeze` does. The state dict is
        unchanged.
        """
        if not self.track_running_stats:
            raise ValueError("BatchNorm.freeze: the layer has track_running_stats=False: no running "
                             "statistics to freeze")
        self.frozen = True
        return self

    def unfreeze(self) -> BatchNorm:
        """Undo :meth:`freeze`; returns ``self``."""
        self.frozen = False
        return self

    # -- forward and backward -----------------------------------------------------------

    def _check_input(self, x: Array) -> None:
        fn = "BatchNorm"
        if namespace_of(fn, x=x) is not self._xp:
            raise TypeError(
                f"{fn}: x is a {describe(x)} array but the parameters are {library_name(self._xp)} "
                f"arrays; create the layer with xp= the library of x"
            )
        ndim = len(x.shape)
        if ndim >= 2 and -ndim <= self.axis < ndim and x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"{fn}: x has {x.shape[self.axis]} features along axis {self.axis} "
                f"(x.shape = {tuple(x.shape)}), expected num_features = {self.num_features}"
            )

    def __call__(self, x: Array, residual: Array | None = None) -> Array:
        """Forward pass; see :meth:`forward`."""
        return self.forward(x, residual)

    def forward(self, x: Array, residual: Array | None = None) -> Array:
        """Normalize ``x`` (shape ``(N, C, *spatial)`` or channels-last per ``axis``).

        Returns an array of the same shape, dtype, namespace and device. In training mode
        with ``track_running_stats``, also updates the running statistics. With the
        layer's ``activation``, returns act(BN(x) [+ residual]) from one fused pass;
        ``residual`` (same shape as x) is added before the activation.
        """
        fused: dict[str, Any] = {"activation": self.activation, "residual": residual}
        if self.activation is None and residual is None:
            fused = {}
        if self.comm is not None and not self.frozen and (
            self.training or not self.track_running_stats or self.population is not None
        ):
            if fused:
                raise ValueError("BatchNorm: activation= and residual= are not available with comm= yet")
            return self._forward_synchronized(x)
        self._check_input(x)
        virtual = self.virtual_batch_size if self.training else None  # ghost BN trains only
        if self.frozen:
            y, saved = _fixed("BatchNorm", x, self.running_mean, self.running_var, self.weight, self.bias,
                              axis=self.axis, eps=self.eps, **fused)
        elif self.population is not None:  # collecting population statistics
            y, saved = batch_norm_train(x, self.weight, self.bias, axis=self.axis, eps=self.eps,
                                        virtual_batch_size=virtual, **fused)
            for part in saved.groups or (saved,):
                self.population.update_from(part)
        elif self.training or not self.track_running_stats:
            y, saved = batch_norm_train(x, self.weight, self.bias, axis=self.axis, eps=self.eps,
                                        virtual_batch_size=virtual, **fused)
            if self.training and self.track_running_stats:
                self._track(saved)
        else:
            y, saved = _fixed("BatchNorm", x, self.running_mean, self.running_var, self.weight, self.bias,
                              axis=self.axis, eps=self.eps, **fused)
        self._saved = saved
        return y

    def _forward_synchronized(self, x: Array) -> Array:
        """A forward pass with batch statistics over every rank of ``self.comm``."""
        fn = "BatchNorm"
        if self.virtual_batch_size is not None:
            raise ValueError(f"{fn}: comm and virtual_batch_size cannot be combined (got both)")
        error = None
        try:  # a bad input must still reach the collectives, so that every rank raises
            self._check_input(x)
        except (TypeError, ValueError) as e:
            error = e
        y, saved = _train_synchronized(fn, x, self.weight, self.bias, self.axis, self.eps, self.comm, error)
        if self.population is not None:
            self.population.update_from(saved)
        elif self.training and self.track_running_stats:
            self._track(saved)
        self._saved = saved
        return y

    def _track(self, saved: BatchNormSaved) -> None:
        """Count the batch and move the running statistics towards its statistics."""
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked += 1
        self.running_mean, self.running_var = update_running_stats(
            self.running_mean, self.running_var, saved, momentum=self.momentum,
            num_batches_tracked=self.num_batches_tracked,
        )

    def backward(self, dy: Array) -> Array:
        """Gradient with respect to the input of the last forward pass.

        Sets ``grad_weight`` and ``grad_bias`` (None when not affine), and
        ``grad_residual`` when the forward pass was given a residual (else None), and
        returns ``dx``, of the shape, dtype, namespace and device of that input. After a
        forward pass in eval mode the statistics are constants and
        ``dx = dy * weight / sqrt(var + eps)``. With an ``activation``, ``dy`` is the
        gradient of the activation's output.
        """
        if self._saved is None:
            raise ValueError("BatchNorm.backward: no forward pass to differentiate; call layer(x) first")
        dx, self.grad_weight, self.grad_bias, *rest = batch_norm_backward(dy, self._saved)
        self.grad_residual = rest[0] if rest else None
        return dx

    # -- population statistics ----------------------------------------------------------

    def estimate_population(
        self, batches: Iterable[Array] | PopulationStats, method: Method = "paper"
    ) -> BatchNorm:
        """Set the running statistics to population estimates.

        This is the inference mode of Ioffe & Szegedy (2015), Algorithm 2, with
        ``method="paper"``; ``"pooled"`` gives the exact statistics of all values. See
        :class:`anybn.PopulationStats`. ``batches`` is any iterable of inputs to this layer
        (the activations that reach it), or a :class:`PopulationStats` already filled, for
        example by forward passes with ``population`` set. Weights and
        ``num_batches_tracked`` are unchanged. Returns ``self``.
        """
        fn = "BatchNorm.estimate_population"
        if not self.track_running_stats:
            raise ValueError(f"{fn}: the layer has track_running_stats=False: no running statistics to fill")
        if method not in ("paper", "pooled"):
            raise ValueError(f"{fn}: method must be 'paper' or 'pooled', got {method!r}")
        if isinstance(batches, PopulationStats):
            stats = batches
            if stats.num_features != self.num_features:
                raise ValueError(
                    f"{fn}: the PopulationStats has num_features = {stats.num_features}, expected "
                    f"{self.num_features}"
                )
        else:
            if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
                raise TypeError(
                    f"{fn}: batches must be an iterable of arrays or a PopulationStats, got "
                    f"{type(batches).__name__}"
                )
            stats = PopulationStats(self.num_features, axis=self.axis)
            for x in batches:
                self._check_input(x)
                stats.update(x)
        if stats.num_batches == 0:
            raise ValueError(f"{fn}: batches is empty (no batch was seen); give at least one batch")
        mean, var = stats.result(method)
        self.running_mean = self._xp.astype(mean, self._dtype)
        self.running_var = self._xp.astype(var, self._dtype)
        return self

    # -- state --------------------------------------------------------------------------

    def _state_keys(self) -> tuple[str, ...]:
        keys: tuple[str, ...] = ("weight", "bias") if self.affine else ()
        if self.track_running_stats:
            keys += ("running_mean", "running_var", "num_batches_tracked")
        return keys

    def state_dict(self) -> dict[str, Array]:
        """The layer's state under PyTorch's names, as arrays of the layer's library.

        Keys: ``weight`` and ``bias`` (when affine), ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` (a 0-d integer array; when tracking running statistics).
        The arrays are the layer's own, not copies; the layer never writes to them in place.
        """
        state: dict[str, Array] = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                info = self._xp.__array_namespace_info__()
                int_dtype = info.default_dtypes(device=self._device)["integral"]
                state[key] = self._xp.asarray(self.num_batches_tracked, dtype=int_dtype, device=self._device)
            else:
                state[key] = getattr(self, key)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` or by ``torch.nn.BatchNorm*d``.

        Values may be arrays of any library (for example
        ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}``); they are copied into
        the layer's library, device and dtype. Keys must be exactly those of
        :meth:`state_dict`; vectors must have shape (num_features,). Nothing is changed
        when the state is rejected.
        """
        fn = "BatchNorm.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{fn}: state must be a mapping of names to arrays (as from state_dict()), "
                f"got {type(state).__name__}"
            )
        expected = set(self._state_keys())
        got = set(state)
        if got != expected:
            missing, unexpected = sorted(expected - got), sorted(got - expected)
            raise ValueError(
                f"{fn}: state keys do not match: missing {missing}, unexpected {unexpected} "
                f"(expected {sorted(expected)})"
            )
        converted: dict[str, Any] = {}
        for key in expected:
            if key == "num_batches_tracked":
                converted[key] = interop.as_count(fn, state[key])
                continue
            value = interop.to_namespace(fn, key, state[key], self._xp, self._device, self._dtype)
            if tuple(value.shape) != (self.num_features,):
                raise ValueError(
                    f"{fn}: {key} has shape {tuple(value.shape)}, expected ({self.num_features},)"
                )
            converted[key] = value
        for key, value in converted.items():
            setattr(self, key, value)

    # -- Keras --------------------------------------------------------------------------

    @classmethod
    def from_keras(
        cls,
        weights: Mapping[str, Any] | Sequence[Any],
        *,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        axis: int = -1,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> BatchNorm:
        """A layer equivalent to a Keras ``BatchNormalization`` with these weights.

        Keras's defaults (``momentum=0.99``, ``epsilon=1e-3``, ``axis=-1``) are Keras's
        names and meanings: its momentum weighs the *old* value, so the layer gets
        ``momentum = 1 - momentum_keras`` (0.99 becomes 0.01). ``weights`` is a dict with the
        keys ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` (``gamma``/``beta``
        may be absent for ``scale=False``/``center=False``), or the list from Keras's
        ``layer.get_weights()`` in that order, which needs all four.

        Keras stores a *biased* moving variance (it averages the biased batch variances),
        while this layer, like PyTorch, averages the unbiased ones. Loaded statistics give
        the same eval outputs as in Keras; further training updates them the PyTorch way.
        """
        named = interop.keras_weight_names("BatchNorm.from_keras", weights)
        momentum = check_real("BatchNorm.from_keras", "momentum", momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm.from_keras: momentum must be in [0, 1], got {momentum}")
        mean = named.get("moving_mean")
        if mean is None:
            raise ValueError(
                f"BatchNorm.from_keras: weights must hold 'moving_mean', got keys {sorted(named)}"
            )
        shape = tuple(getattr(mean, "shape", ()))
        if len(shape) != 1:
            raise ValueError(f"BatchNorm.from_keras: moving_mean must have shape (C,), got {shape}")
        num_features = int(shape[0])
        layer = cls(
            num_features,
            axis=axis,
            eps=epsilon,
            momentum=1.0 - momentum,
            affine=True,
            xp=xp,
            device=device,
            dtype=dtype,
        )
        layer.load_keras_weights(named)
        return layer

    def load_keras_weights(self, weights: Mapping[str, Any]) -> None:
        """Load Keras-named weights: ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``.

        A missing ``gamma`` (Keras ``scale=False``) loads as ones and a missing ``beta``
        (``center=False``) as zeros. ``num_batches_tracked`` becomes 0. See :meth:`from_keras`
        for the momentum conversion and the biased moving variance.
        """
        state = interop.keras_state(
            "BatchNorm.load_keras_weights", weights, affine=self.affine,
            track_running_stats=self.track_running_stats, ones=self._full(1.0), zeros=self._full(0.0),
        )
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, xp={library_name(self._xp)}"
            + ("" if self.virtual_batch_size is None else f", virtual_batch_size={self.virtual_batch_size}")
            + ("" if self.activation is None else f", activation={self.activation!r}")
            + (", frozen" if self.frozen else "") + ")"
        )


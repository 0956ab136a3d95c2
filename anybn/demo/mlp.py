"""A small sigmoid MLP written against the array API, with optional anybn batch norm.

This is the example of embedding anybn in a library: the model finds the namespace of
its parameters with ``array_api_compat.array_namespace``, so the same code trains on
NumPy, CuPy, PyTorch, JAX or array-api-strict arrays. It never writes into an array in
place (JAX arrays are immutable) and uses only anybn's public API: :class:`anybn.BatchNorm`
with its ``backward``, ``estimate_population``, ``weight`` and ``bias``.

Arrays are (N, D) batches of row vectors; weights are (fan_in, fan_out) so a layer is
``h @ W + b``. Every array has the floating dtype of the weights (float32 in the demo).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import array_api_compat
import numpy as np

from anybn import BatchNorm

__all__ = ["MLP", "init_weights", "sigmoid", "softmax_cross_entropy"]

Array = Any


def init_weights(sizes: Sequence[int], *, rng: np.random.Generator, std: float) -> list[np.ndarray]:
    """Gaussian weights N(0, std^2) for the layers ``sizes[i] -> sizes[i + 1]``.

    Returns float64 NumPy arrays of shape (sizes[i], sizes[i + 1]). They are drawn on the
    host so that every backend starts from the same numbers; convert them with the
    backend's ``asarray``.
    """
    return [rng.normal(0.0, std, size=(m, n)) for m, n in zip(sizes[:-1], sizes[1:])]


def sigmoid(z: Array) -> Array:
    """Logistic function, elementwise; same shape, dtype and namespace as ``z``."""
    xp = array_api_compat.array_namespace(z)
    # the tanh form never overflows, unlike 1 / (1 + exp(-z)) for large negative z
    return 0.5 * (xp.tanh(0.5 * z) + 1.0)


def softmax_cross_entropy(logits: Array, labels: Array, *, total: int | None = None) -> tuple[Array, Array]:
    """Mean softmax cross-entropy and its gradient with respect to ``logits``.

    Parameters
    ----------
    logits : array, shape (N, K), real floating dtype
    labels : array, shape (N,), integer dtype, values in [0, K); same namespace and device
    total : int, optional
        The number of examples the mean is over (default N). Data parallel, each rank
        passes the global minibatch size: its rows' terms, summed over ranks, are then the
        global mean and its gradient.

    Returns
    -------
    loss : 0-d array of the dtype of ``logits``: the sum of the rows' losses / ``total``
    dlogits : array, shape (N, K): ``(softmax(logits) - onehot(labels)) / total``
    """
    xp = array_api_compat.array_namespace(logits, labels)
    k = logits.shape[1]
    n = logits.shape[0] if total is None else total
    classes = xp.arange(k, dtype=labels.dtype, device=array_api_compat.device(labels))
    onehot = xp.astype(xp.expand_dims(labels, axis=1) == classes, logits.dtype)
    # log-sum-exp shifted by the row maximum: exp never overflows
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    row_sums = xp.sum(exp, axis=1, keepdims=True)
    log_probs = shifted - xp.log(row_sums)
    loss = -xp.sum(onehot * log_probs) / n
    dlogits = (exp / row_sums - onehot) / n
    return loss, dlogits


class MLP:
    """Linear -> [BatchNorm] -> sigmoid for each hidden layer, then a linear output layer.

    Parameters
    ----------
    weights : sequence of arrays, shapes (D0, D1), (D1, D2), ..., (DL-1, K)
        Initial weights, all of one array library, device and real floating dtype; the
        model keeps them (no copy). The hidden biases start at 0. With ``batch_norm`` the
        hidden layers have no bias: the batch norm's ``bias`` (beta) takes its place.
    batch_norm : bool
        Insert an :class:`anybn.BatchNorm` after each hidden linear layer, before the sigmoid.

    Attributes
    ----------
    weights, biases : lists of arrays; ``biases[i]`` is None where a batch norm follows.
    norms : list of BatchNorm, one per hidden layer (empty without ``batch_norm``).
    sigmoid_inputs : list of (N, D_i) arrays, the inputs to each layer of sigmoids in the
        last forward pass (for a batch-norm net, the batch norm outputs).
    norm_inputs : list of (N, D_i) arrays, the inputs to each batch norm in the last forward.
    """

    def __init__(self, weights: Sequence[Array], *, batch_norm: bool) -> None:
        if len(weights) < 2:
            raise ValueError(f"MLP: needs at least 2 weight matrices (one hidden layer), got {len(weights)}")
        xp = array_api_compat.array_namespace(*weights)
        for i, (a, b) in enumerate(zip(weights[:-1], weights[1:])):
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"MLP: weights[{i}] has shape {a.shape} but weights[{i + 1}] has shape {b.shape}")
        self._xp = xp
        first = weights[0]
        device, dtype = array_api_compat.device(first), first.dtype
        self.weights: list[Array] = list(weights)
        hidden = [w.shape[1] for w in weights[:-1]]
        self.norms: list[BatchNorm] = (
            [BatchNorm(d, xp=xp, device=device, dtype=dtype) for d in hidden] if batch_norm else []
        )
        self.biases: list[Array | None] = [
            None if batch_norm else xp.zeros(d, dtype=dtype, device=device) for d in hidden
        ] + [xp.zeros(weights[-1].shape[1], dtype=dtype, device=device)]
        self.grad_weights: list[Array] = []  # set by backward
        self.grad_biases: list[Array | None] = []
        self.sigmoid_inputs: list[Array] = []
        self.norm_inputs: list[Array] = []
        self._layer_inputs: list[Array] = []  # h_{i-1} for each linear layer, for backward
        self._sigmoid_outputs: list[Array] = []

    # -- modes --------------------------------------------------------------------------

    def train(self) -> MLP:
        """Batch norms use batch statistics and update their running averages."""
        for norm in self.norms:
            norm.train()
        return self

    def eval(self) -> MLP:
        """Batch norms use their running statistics (or population estimates)."""
        for norm in self.norms:
            norm.eval()
        return self

    # -- forward and backward -----------------------------------------------------------

    def __call__(self, x: Array) -> Array:
        """Logits of shape (N, K) for inputs ``x`` of shape (N, D0), in the weights' dtype."""
        layer_inputs, sigmoid_inputs, sigmoid_outputs, norm_inputs = [], [], [], []
        h = x
        for i, w in enumerate(self.weights[:-1]):
            layer_inputs.append(h)
            z = h @ w
            if self.norms:
                norm_inputs.append(z)
                u = self.norms[i](z)
            else:
                u = z + self.biases[i]
            h = sigmoid(u)
            sigmoid_inputs.append(u)
            sigmoid_outputs.append(h)
        layer_inputs.append(h)
        self._layer_inputs, self._sigmoid_outputs = layer_inputs, sigmoid_outputs
        self.sigmoid_inputs, self.norm_inputs = sigmoid_inputs, norm_inputs
        return h @ self.weights[-1] + self.biases[-1]

    def backward(self, dlogits: Array) -> None:
        """Gradients of the loss for the last forward pass, given ``dlogits`` (N, K).

        Sets ``grad_weights`` and ``grad_biases`` here and ``grad_weight``/``grad_bias`` on
        each batch norm. The forward pass must have run in training mode.
        """
        if not self._layer_inputs:
            raise ValueError("MLP.backward: no forward pass to differentiate; call the model first")
        xp = self._xp
        grad_weights, grad_biases = [], []
        dz = dlogits
        for i in reversed(range(len(self.weights))):
            h = self._layer_inputs[i]
            grad_weights.append(h.T @ dz)
            grad_biases.append(None if self.biases[i] is None else xp.sum(dz, axis=0))
            if i == 0:
                break
            dh = dz @ self.weights[i].T
            s = self._sigmoid_outputs[i - 1]
            du = dh * s * (1.0 - s)
            dz = self.norms[i - 1].backward(du) if self.norms else du
        self.grad_weights, self.grad_biases = grad_weights[::-1], grad_biases[::-1]

    def sgd_step(self, lr: float) -> None:
        """Plain SGD on every parameter, with new arrays (nothing is written in place)."""
        if not self.grad_weights:
            raise ValueError("MLP.sgd_step: no gradients; call backward first")
        self.weights = [w - lr * g for w, g in zip(self.weights, self.grad_weights)]
        self.biases = [
            None if b is None or g is None else b - lr * g for b, g in zip(self.biases, self.grad_biases)
        ]
        for norm in self.norms:
            # weight and bias are typed optional (affine=False); these layers are affine
            weight, bias, grad_weight, grad_bias = norm.weight, norm.bias, norm.grad_weight, norm.grad_bias
            if weight is None or bias is None or grad_weight is None or grad_bias is None:
                raise ValueError("MLP.sgd_step: a batch norm has no gradients; call backward first")
            norm.weight = weight - lr * grad_weight
            norm.bias = bias - lr * grad_bias

    # -- inference statistics -----------------------------------------------------------

    def estimate_population(self, batches: Iterable[Array], method: Literal["paper", "pooled"] = "paper") -> MLP:
        """Replace each batch norm's running statistics by population estimates.

        Algorithm 2 of Ioffe & Szegedy (2015): the training network (batch statistics)
        processes ``batches`` of inputs (N, D0); each batch norm then averages the
        statistics of the values that reached it. Leaves the model in eval mode.
        """
        if not self.norms:
            return self.eval()
        collected: list[list[Array]] = [[] for _ in self.norms]
        self.train()
        for x in batches:
            self(x)  # also moves the running averages; estimate_population replaces them
            for inputs, z in zip(collected, self.norm_inputs):
                inputs.append(z)
        for norm, inputs in zip(self.norms, collected):
            norm.estimate_population(inputs, method=method)
        return self.eval()

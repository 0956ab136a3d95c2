"""Figure 1 of Ioffe & Szegedy (2015): the same sigmoid MLP trained with and without batch norm.

Both networks start from the same weights and see the same minibatches, with the same
learning rate and plain SGD. At every evaluation step the test accuracy of each, and the
15th, 50th and 85th percentiles (over the test set) of the input to one fixed sigmoid of
the last hidden layer, are recorded. After training the batch-norm network is evaluated
with its running averages and with population statistics (Algorithm 2 of the paper).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .. import testing
from .._progress import progress
from ..distributed import synchronize
from .data import Dataset
from .mlp import MLP, init_weights, softmax_cross_entropy
from .parallel import all_reduce_gradients, share, shares

__all__ = ["Config", "import_backend", "percentiles", "run_experiment"]

Array = Any

# "jax" and "dask" name packages whose array module is a submodule
_ALIASES = {"jax": "jax.numpy", "dask": "dask.array"}
QUANTILES = (15, 50, 85)


@dataclass(frozen=True)
class Config:
    """The settings of one run; the defaults are those of ``python -m anybn demo``.

    The step count and learning rate were chosen by measurement on the MNIST test set
    split 8,000 / 2,000 (see docs/demo.md); the initialization is the paper's "small
    random Gaussian values".
    """

    steps: int = 10000
    lr: float = 0.5
    seed: int = 0
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.02
    eval_every: int = 0  # 0: steps // 100, at least 1
    unit: int = 0  # the tracked sigmoid of the last hidden layer
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"Config: lr must be > 0, got {self.lr}")
        if not self.init_std > 0:
            raise ValueError(f"Config: init_std must be > 0, got {self.init_std}")
        if self.eval_every < 0:
            raise ValueError(f"Config: eval_every must be >= 0 (0: steps // 100), got {self.eval_every}")
        if not self.hidden or not 0 <= self.unit < self.hidden[-1]:
            raise ValueError(f"Config: unit must be in [0, {self.hidden[-1] if self.hidden else 0}), got {self.unit}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"Config: dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def evaluation_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 100)


def import_backend(name: str | ModuleType) -> ModuleType:
    """The array module called ``name``: numpy, cupy, torch, jax (jax.numpy), dask (dask.array),
    array_api_strict, or any importable module with an array-API ``asarray``. A module is
    returned as it is."""
    if isinstance(name, ModuleType):
        module, module_name = name, name.__name__
    else:
        module_name = _ALIASES.get(name, name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"backend {name!r}: cannot import {module_name} ({exc})") from None
    if not callable(getattr(module, "asarray", None)):
        raise ValueError(f"backend {name!r}: {module_name} has no asarray; it is not an array library")
    return module


def _backend(module: ModuleType, dtype: str, device: Any) -> testing.Backend:
    """NumPy data -> arrays of ``module`` on ``device`` (:func:`anybn.testing.for_module`), checked
    to make ``dtype`` arrays."""
    be = testing.for_module(module, device)  # ValueError when its arrays are not array-API arrays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns, then gives float32 without x64
        made = be.asarray(np.zeros(1), dtype).dtype
    if made != be.dtype(dtype):
        raise ValueError(f"backend {be.name}: cannot make {dtype} arrays (for JAX, enable jax_enable_x64)")
    return be


@contextlib.contextmanager
def _thread_limit(threads: int) -> Iterator[None]:
    """At most ``threads`` BLAS/OpenMP threads inside, with threadpoolctl (scikit-learn brings it)."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        threadpool_limits = None
    if threads <= 0 or threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=threads):
        yield


def percentiles(values: Array, qs: tuple[float, ...] = QUANTILES) -> list[float]:
    """Percentiles of a 1-d array, linearly interpolated like ``numpy.percentile``.

    Array API only (a sort and a few scalar reads), so the values never leave their device
    as a whole.
    """
    xp = array_api_compat.array_namespace(values)
    s = xp.sort(values)
    n = s.shape[0]
    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        lo = math.floor(position)
        hi = min(lo + 1, n - 1)
        a, b = float(s[lo]), float(s[hi])
        out.append(a + (b - a) * (position - lo))
    return out


def _accuracy(xp: Any, logits: Array, labels: Array) -> float:
    hits = xp.argmax(logits, axis=1) == labels
    # a float sum of at most 2**24 ones is exact, and the division happens in Python:
    # every backend gives the very same number
    return float(xp.sum(xp.astype(hits, logits.dtype))) / labels.shape[0]


def _evaluate(xp: Any, net: MLP, x_test: Array, y_test: Array, unit: int) -> tuple[float, list[float]]:
    """Test accuracy, and the percentiles of the input to sigmoid ``unit`` of the last hidden layer."""
    net.eval()
    logits = net(x_test)
    accuracy = _accuracy(xp, logits, y_test)
    band = percentiles(net.sigmoid_inputs[-1][:, unit])
    net.train()
    return accuracy, band


_NORM_STATE = ("weight", "bias", "running_mean", "running_var")


def _persist(net: MLP, loss_sum: Array) -> Array:
    """Compute a lazy (Dask) model's state now; returns ``loss_sum`` computed too.

    Without this, every parameter's task graph would hold all earlier steps, and each
    evaluation would recompute the whole run.
    """
    import dask

    norms = net.norms
    state = [*net.weights, *net.biases, *(getattr(n, k) for n in norms for k in _NORM_STATE), loss_sum]
    done = iter(dask.persist(*state))
    net.weights = [next(done) for _ in net.weights]
    net.biases = [next(done) for _ in net.biases]
    for norm in norms:
        for key in _NORM_STATE:
            setattr(norm, key, next(done))
    return next(done)


def run_experiment(
    data: Dataset,
    config: Config = Config(),
    *,
    backend: str | ModuleType = "numpy",
    device: Any = None,
    threads: int = 1,
    show_progress: bool = False,
    comm: Any = None,
    save_params: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train the two networks and return the results (the content of results.json).

    Parameters
    ----------
    data : Dataset
        Train and test images as float32 NumPy arrays; they are copied to ``backend`` once.
    config : Config
    backend : str or module
        The array library to run on; see :func:`import_backend`.
    device : optional
        The device for the arrays, in the backend's terms; its default device when None.
    threads : int, default 1
        Limit on BLAS and OpenMP threads while training (0: no limit). The matrices are
        small: on 2 shared cores, 10,000 MNIST steps took 14 s with one thread and
        60-250 s with two competing for the cores.
    show_progress : bool
        Draw a progress bar on stderr (on rank 0 only, with ``comm``).
    comm : anybn.distributed.Communicator, optional
        Train data-parallel over the ranks of ``comm`` (every rank calls this function
        with the same arguments). Each rank draws the same minibatches and trains on its
        own rows of each (:func:`anybn.demo.parallel.share`: 10, 20 and 30 of 60 on 3
        ranks); the batch norms normalize with the statistics of the global minibatch;
        each rank's loss is divided by the global minibatch size and one all-reduce per
        network and step sums the gradients (:func:`anybn.demo.parallel.all_reduce_gradients`).
        Rank 0 alone evaluates (eval mode makes no collective) and returns the results;
        the other ranks return None. The trained parameters equal the single-process ones
        up to rounding.
    save_params : str or Path, optional
        Write the final parameters of both networks (and the batch norms' running
        statistics, before the population estimate) to this ``.npz`` file, as float64
        NumPy arrays named ``bn.weights.0``, ``bn.norms.0.weight``, ``plain.biases.3``, ...
        (rank 0 only, with ``comm``), for comparing runs.

    Returns
    -------
    dict with ``curves`` (per network: ``step``, ``test_accuracy``, ``train_loss``, the mean
    training loss since the previous evaluation), ``percentiles`` (per network: ``step``,
    ``p15``, ``p50``, ``p85``), ``final`` (``bn``: ``running`` and ``population`` test
    accuracy; ``plain``), and ``config``, ``data``, ``backend``, ``sigmoid_unit``, and with
    ``comm`` also ``data_parallel`` (``ranks``, ``shares``: the rows of each rank per
    minibatch). The same inputs give the same dict. None on the ranks other than 0.
    """
    be = _backend(import_backend(backend), config.dtype, device)
    with _thread_limit(threads):
        return _run(data, config, be, show_progress, comm, save_params)


def _parameters(be: testing.Backend, nets: dict[str, MLP]) -> dict[str, np.ndarray]:
    """Every parameter (and running statistic) of ``nets`` as float64 NumPy arrays, by name."""
    params: dict[str, np.ndarray] = {}
    for name, net in nets.items():
        for i, w in enumerate(net.weights):
            params[f"{name}.weights.{i}"] = be.to_numpy(w).astype(np.float64)
        for i, b in enumerate(net.biases):
            if b is not None:
                params[f"{name}.biases.{i}"] = be.to_numpy(b).astype(np.float64)
        for i, norm in enumerate(net.norms):
            for key in _NORM_STATE:
                params[f"{name}.norms.{i}.{key}"] = be.to_numpy(getattr(norm, key)).astype(np.float64)
    return params


def _run(
    data: Dataset, config: Config, be: testing.Backend, show_progress: bool, comm: Any, save_params: str | Path | None
) -> dict[str, Any] | None:
    xp = be.xp
    rng = np.random.default_rng(config.seed)
    sizes = (data.num_features, *config.hidden, data.num_classes)
    initial = init_weights(sizes, rng=rng, std=config.init_std)
    floats = config.dtype  # weights and images in the run's dtype; labels keep their integers
    nets = {
        "bn": MLP([be.asarray(w, floats) for w in initial], batch_norm=True),
        "plain": MLP([be.asarray(w, floats) for w in initial], batch_norm=False),
    }
    x_train, y_train = be.asarray(data.x_train, floats), be.asarray(data.y_train)
    x_test, y_test = be.asarray(data.x_test, floats), be.asarray(data.y_test)

    n_train, batch = data.x_train.shape[0], config.batch_size
    if batch > n_train:
        raise ValueError(f"run_experiment: batch_size {batch} exceeds the {n_train} training examples")
    # this rank's rows of every minibatch; every rank draws the same minibatches from rng
    start, stop = (0, batch) if comm is None else share(batch, comm.rank, comm.size)
    lead = comm is None or comm.rank == 0  # evaluates, shows progress, returns the results
    if comm is not None:
        synchronize(nets["bn"], comm)
    per_epoch = n_train // batch  # the remainder of each shuffled epoch is left out

    curves: dict[str, dict[str, list[Any]]] = {
        name: {"step": [], "test_accuracy": [], "train_loss": []} for name in nets
    }
    bands: dict[str, dict[str, list[Any]]] = {name: {"step": [], "p15": [], "p50": [], "p85": []} for name in nets}
    loss_sums: dict[str, Any] = {name: 0.0 for name in nets}
    every = config.evaluation_interval

    def record(step: int, name: str, train_loss: float | None) -> None:
        accuracy, band = _evaluate(xp, nets[name], x_test, y_test, config.unit)
        curve = curves[name]
        curve["step"].append(step)
        curve["test_accuracy"].append(accuracy)
        curve["train_loss"].append(train_loss)  # None at step 0: no training yet
        bands[name]["step"].append(step)
        for key, value in zip(("p15", "p50", "p85"), band):
            bands[name][key].append(value)

    for name, net in nets.items():
        net.train()
        if lead:
            record(0, name, None)

    lazy = array_api_compat.is_dask_namespace(xp)
    order: Array = None
    last_evaluated = 0
    steps = range(1, config.steps + 1)
    for step in progress(steps, total=config.steps, desc="training", enabled=show_progress and lead):
        position = (step - 1) % per_epoch
        if position == 0:
            order = be.asarray(rng.permutation(n_train)[: per_epoch * batch])
        indices = order[position * batch + start : position * batch + stop]
        xb, yb = xp.take(x_train, indices, axis=0), xp.take(y_train, indices, axis=0)
        for name, net in nets.items():
            # divided by the global minibatch size: the ranks' terms sum to the mean loss
            loss, dlogits = softmax_cross_entropy(net(xb), yb, total=batch)
            net.backward(dlogits)
            if comm is not None:
                loss = all_reduce_gradients(net, comm, loss)
            net.sgd_step(config.lr)
            loss_sums[name] = loss_sums[name] + loss  # an array: no device sync every step
            if lazy:
                loss_sums[name] = _persist(net, loss_sums[name])
        if step % every == 0 or step == config.steps:
            for name in nets:
                if lead:
                    record(step, name, float(loss_sums[name]) / (step - last_evaluated))
                loss_sums[name] = 0.0
            last_evaluated = step

    if not lead:
        return None
    if save_params is not None:
        Path(save_params).parent.mkdir(parents=True, exist_ok=True)
        with open(save_params, "wb") as file:  # the very path given (np.savez would add .npz)
            np.savez(file, **_parameters(be, nets))  # type: ignore[arg-type]
    bn, plain = nets["bn"], nets["plain"]
    if comm is not None:
        synchronize(bn, None)  # rank 0 alone estimates the population statistics
    running = _accuracy(xp, bn.eval()(x_test), y_test)
    # Algorithm 2: statistics over one pass of training minibatches of the training size
    bn.estimate_population((x_train[i * batch : (i + 1) * batch, :] for i in range(per_epoch)), method="paper")
    population = _accuracy(xp, bn(x_test), y_test)
    return {
        "backend": be.name,
        "config": {**asdict(config), "hidden": list(config.hidden), "eval_every": every},
        "data": data.describe(),
        "sigmoid_unit": {"layer": len(config.hidden), "index": config.unit},
        **({} if comm is None else {"data_parallel": {"ranks": comm.size, "shares": shares(batch, comm.size)}}),
        "curves": curves,
        "percentiles": bands,
        "final": {
            "bn": {"running": running, "population": population},
            "plain": _accuracy(xp, plain.eval()(x_test), y_test),
        },
    }

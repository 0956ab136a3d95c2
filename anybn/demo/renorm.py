"""The batch renormalization paper's claim (Ioffe 2017, section 4.3): non-i.i.d. minibatches.

The demo MLP (``anybn.demo.mlp``) is trained three ways, from the same initial weights:

- ``bn_iid``: batch normalization, minibatches of 60 drawn uniformly (the baseline);
- ``bn_noniid``: batch normalization, minibatches of 60 drawn from 2 classes each
  (30 + 30 examples), as in the paper's non-i.i.d. experiment;
- ``renorm_noniid``: batch renormalization on the same non-i.i.d. minibatches, with the
  paper's schedule of rmax and dmax (scaled to the run's length).

Every network is evaluated on the test set with its running statistics (the inference the
paper reports). Batch normalization trained on 2-class minibatches learns to rely on the
batch statistics, which never look like those of the test set; renormalization corrects
them towards the running statistics during training, so training and inference agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import anybn

from .._progress import progress
from .data import Dataset
from .experiment import _accuracy, _backend, _thread_limit, import_backend
from .mlp import MLP, init_weights, softmax_cross_entropy

__all__ = ["RenormConfig", "SETTINGS", "run_renorm_experiment"]

SETTINGS = ("bn_iid", "bn_noniid", "renorm_noniid")


@dataclass(frozen=True)
class RenormConfig:
    """The settings of the renorm experiment; defaults are those of ``--experiment renorm``.

    ``warmup``, ``rmax_at`` and ``dmax_at`` are fractions of ``steps``: the paper's 5k, 40k
    and 25k steps of a ~130k-step run, rounded.
    """

    steps: int = 3000
    lr: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 60
    classes_per_batch: int = 2
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.02
    momentum: float = 0.01
    rmax: float = 3.0
    dmax: float = 5.0
    warmup: float = 0.05
    rmax_at: float = 0.3
    dmax_at: float = 0.2
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or not self.seeds:
            raise ValueError(f"RenormConfig: steps >= 1, batch_size >= 2 and a seed needed, got {self}")
        if self.batch_size % self.classes_per_batch:
            raise ValueError(f"RenormConfig: classes_per_batch={self.classes_per_batch} must divide "
                             f"batch_size={self.batch_size}")
        if not 0 <= self.warmup <= min(self.rmax_at, self.dmax_at) <= 1:
            raise ValueError("RenormConfig: need 0 <= warmup <= rmax_at, dmax_at <= 1")

    def limits(self, step: int) -> tuple[float, float]:
        """(rmax, dmax) at ``step`` (:func:`anybn.renorm_limits` scaled to ``steps``)."""
        return anybn.renorm_limits(step, warmup=round(self.warmup * self.steps), rmax=self.rmax, dmax=self.dmax,
                                   rmax_step=round(self.rmax_at * self.steps),
                                   dmax_step=round(self.dmax_at * self.steps))


def _batches(y: np.ndarray, config: RenormConfig, noniid: bool, rng: np.random.Generator) -> np.ndarray:
    """(steps, batch_size) indices: uniform, or ``classes_per_batch`` classes per batch."""
    n = y.shape[0]
    if not noniid:
        return np.stack([rng.choice(n, config.batch_size, replace=False) for _ in range(config.steps)])
    by_class = [np.flatnonzero(y == k) for k in range(int(y.max()) + 1)]
    per_class = config.batch_size // config.classes_per_batch
    out = np.empty((config.steps, config.batch_size), dtype=np.int64)
    for s in range(config.steps):
        classes = rng.choice(len(by_class), config.classes_per_batch, replace=False)
        out[s] = np.concatenate([rng.choice(by_class[k], per_class, replace=len(by_class[k]) < per_class)
                                 for k in classes])
    return out


def _train(be: Any, data: Dataset, config: RenormConfig, setting: str, seed: int,
           show_progress: bool) -> dict[str, Any]:
    xp = be.xp
    rng = np.random.default_rng(seed)
    sizes = (data.num_features, *config.hidden, data.num_classes)
    initial = init_weights(sizes, rng=rng, std=config.init_std)
    net = MLP([be.asarray(w, config.dtype) for w in initial], batch_norm=True)
    renorm = setting.startswith("renorm")
    dev, dt = be.device, be.dtype(config.dtype)
    net.norms = [
        (anybn.BatchRenorm(d, momentum=config.momentum, xp=be.module, device=dev, dtype=dt) if renorm
         else anybn.BatchNorm(d, momentum=config.momentum, xp=be.module, device=dev, dtype=dt))
        for d in config.hidden
    ]
    # the same minibatch stream for every setting of a seed and kind
    batches = _batches(data.y_train, config, setting.endswith("noniid"), np.random.default_rng(1000 + seed))
    x_train, y_train = be.asarray(data.x_train, config.dtype), be.asarray(data.y_train)
    x_test, y_test = be.asarray(data.x_test, config.dtype), be.asarray(data.y_test)
    net.train()
    for step in progress(range(config.steps), total=config.steps, desc=f"{setting} seed {seed}",
                         enabled=show_progress):
        if renorm:
            rmax, dmax = config.limits(step)
            for norm in net.norms:
                norm.rmax, norm.dmax = rmax, dmax  # type: ignore[attr-defined]
        idx = be.asarray(batches[step])
        xb, yb = xp.take(x_train, idx, axis=0), xp.take(y_train, idx, axis=0)
        _, dlogits = softmax_cross_entropy(net(xb), yb)
        net.backward(dlogits)
        net.sgd_step(config.lr)
    running = _accuracy(xp, net.eval()(x_test), y_test)
    # the same network with the test set's own batch statistics, for contrast
    net.train()
    for norm in net.norms:
        norm.track_running_stats = False  # batch statistics, nothing updated
        norm.training = False
    batch_stats = _accuracy(xp, net(x_test), y_test)
    return {"running": running, "test_batch_statistics": batch_stats}


def run_renorm_experiment(
    data: Dataset,
    config: RenormConfig = RenormConfig(),
    *,
    backend: str = "numpy",
    device: Any = None,
    threads: int = 1,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train every setting for every seed; return the content of results.json.

    Returns
    -------
    dict with ``accuracy`` (setting -> list of the seeds' test accuracies with running
    statistics), ``test_batch_statistics`` (the same networks normalizing the whole test
    set with its own statistics), ``mean``, ``config``, ``data`` and ``backend``.
    """
    be = _backend(import_backend(backend), config.dtype, device)
    accuracy: dict[str, list[float]] = {s: [] for s in SETTINGS}
    batch_stats: dict[str, list[float]] = {s: [] for s in SETTINGS}
    with _thread_limit(threads):
        for seed in config.seeds:
            for setting in SETTINGS:
                r = _train(be, data, config, setting, seed, show_progress)
                accuracy[setting].append(r["running"])
                batch_stats[setting].append(r["test_batch_statistics"])
    return {
        "experiment": "renorm",
        "backend": be.name,
        "config": {**asdict(config), "hidden": list(config.hidden), "seeds": list(config.seeds)},
        "data": data.describe(),
        "accuracy": accuracy,
        "test_batch_statistics": batch_stats,
        "mean": {s: float(np.mean(v)) for s, v in accuracy.items()},
    }


def plot_renorm(results: dict[str, Any], path: Any) -> Any:
    """Bar chart of the settings' test accuracies (running statistics), one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"bn_iid": "BN\ni.i.d. batches", "bn_noniid": "BN\n2-class batches",
              "renorm_noniid": "Batch renorm\n2-class batches"}
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for i, s in enumerate(SETTINGS):
        values = results["accuracy"][s]
        ax.bar(i, np.mean(values), color=("0.6", "tab:red", "tab:blue")[i], width=0.6)
        ax.plot([i] * len(values), values, "k.", ms=6)
        ax.text(i, np.mean(values) + 0.01, f"{np.mean(values):.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(SETTINGS)), [labels[s] for s in SETTINGS])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy (running statistics)")
    d = results["data"]
    ax.set_title(f"{d['name']}, {results['config']['steps']} steps, {len(results['config']['seeds'])} seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

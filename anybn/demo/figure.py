"""The figure, laid out like Figure 1 of Ioffe & Szegedy (2015): (a) test accuracy,
(b) the input to a sigmoid without batch norm, (c) with batch norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_figure1"]

_COLORS = {"plain": "#1f77b4", "bn": "#d62728"}
_LABELS = {"plain": "Without BN", "bn": "With BN"}


def plot_figure1(results: dict[str, Any], path: str | Path) -> Path:
    """Draw ``results`` (as returned by ``run_experiment``) into a PNG at ``path``; returns the path.

    Uses matplotlib's Agg backend, imported here so that the rest of the demo runs without
    matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
    acc = axes[0]
    for name in ("plain", "bn"):
        curve = results["curves"][name]
        acc.plot(curve["step"], curve["test_accuracy"], color=_COLORS[name], label=_LABELS[name])
    acc.set_xlabel("training step")
    acc.set_ylabel("test accuracy")
    acc.set_ylim(0.0, 1.0)
    acc.grid(alpha=0.3)
    acc.set_title("(a)", loc="left")

    unit = results.get("sigmoid_unit", {})
    bands = results["percentiles"]
    low = min(min(bands[n]["p15"]) for n in bands)
    high = max(max(bands[n]["p85"]) for n in bands)
    pad = 0.05 * (high - low or 1.0)
    for ax, name, label in zip(axes[1:], ("plain", "bn"), ("(b)", "(c)")):
        band = bands[name]
        for key, style in (("p15", ":"), ("p50", "-"), ("p85", "--")):
            ax.plot(band["step"], band[key], style, color=_COLORS[name])
        ax.fill_between(band["step"], band["p15"], band["p85"], color=_COLORS[name], alpha=0.12)
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("training step")
        ax.set_ylabel("input to the sigmoid")
        ax.set_title(f"{label} {_LABELS[name].replace('W', 'w')}", loc="left")
        ax.grid(alpha=0.3)
    # one legend under the panels: inside any panel it covers a curve at some run length
    handles = [Line2D([], [], color=_COLORS[n], label=_LABELS[n]) for n in ("plain", "bn")]
    handles += [Line2D([], [], linestyle=style, color="0.3", label=f"{p}th percentile")  # type: ignore[arg-type]
                for p, style in (("15", ":"), ("50", "-"), ("85", "--"))]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    data = results.get("data", {})
    fig.suptitle(
        f"{data.get('name', '')}: {data.get('train', '?')} train / {data.get('test', '?')} test images; "
        f"sigmoid {unit.get('index', '?')} of hidden layer {unit.get('layer', '?')}, "
        "percentiles over the test set",
        fontsize="medium",
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

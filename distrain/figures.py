"""Pictures of results, as PNG bytes: confusion matrix, most confident mistakes, learning curves, sweeps.

Usage:
    from distrain.figures import confusion_png, errors_png, curves_png, sweep_png
    png = curves_png(history, phases=[(3, "phase 2")])    # train/val loss, val top-1, lr per epoch
    Path("curves.png").write_bytes(png)

Pure functions of numbers (matplotlib's Agg backend, no display), so training, sweeps and `distrain eval` all draw
with them. Every figure names its axes and units and is legible at 100 %.
"""

from __future__ import annotations

import io

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def confusion_png(conf: np.ndarray, classes: list[str], title: str = "") -> bytes:
    """Row-normalized confusion matrix (diagonal = recall) with counts in the cells when they fit."""
    plt = _figure()
    n = len(classes)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=float), where=rows > 0)
    side = min(24.0, max(4.5, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8 if n > 20 else 10)
        ax.set_yticks(range(n), classes, fontsize=8 if n > 20 else 10)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=7 if n > 15 else 9,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig, plt)


def errors_png(rows: list, classes: list[str], count: int, columns: int = 8) -> bytes:
    """A grid of the most confident misclassifications (the model's input crops), worst first."""
    plt = _figure()
    if not rows:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassifications in {count} images", ha="center", va="center")
        return _png(fig, plt)
    cols = min(columns, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.1 * cols, 2.6 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (conf, key, image, true, pred) in zip(axes.flat, rows, strict=False):
        ax.imshow(image, interpolation="nearest" if image.shape[0] < 96 else "antialiased")
        ax.set_title(f"{str(key)[-22:]}\ntrue {classes[true]}\npred {classes[pred]} ({conf:.2f})", fontsize=7)
    fig.suptitle(f"most confident mistakes ({len(rows)} shown)", fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()



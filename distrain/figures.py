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


def curves_png(history: list[dict], title: str = "") -> bytes:
    """Learning curves of a run, per epoch: train and val loss, val top-1 (and top-5), learning rate; phase
    boundaries (the `phase` of each epoch) as dashed lines."""
    plt = _figure()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    loss, acc, lr = axes
    loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    loss.legend()
    acc.plot(epochs, [100 * h["val_top1"] for h in history], "o-", label="top-1")
    if all("val_top5" in h for h in history):
        acc.plot(epochs, [100 * h["val_top5"] for h in history], "s--", label="top-5", alpha=0.7)
    best = max(history, key=lambda h: h["val_top1"])
    acc.annotate(f"best {100 * best['val_top1']:.2f} %", (best["epoch"], 100 * best["val_top1"]),
                 textcoords="offset points", xytext=(0, -16), ha="center", fontsize=9)
    acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
    low, high = acc.get_ylim()
    acc.set_ylim(max(0.0, low), min(100.5, high) if high > 100 else high)  # a percentage never leaves 0-100
    acc.legend()
    lr.plot(epochs, [h["lr"] for h in history], "o-")
    lr.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate")
    lr.set_yscale("log")
    phases = [h.get("phase", 1) for h in history]
    for i in range(1, len(history)):
        if phases[i] != phases[i - 1]:
            for ax in axes:
                ax.axvline(epochs[i] - 0.5, color="gray", linestyle="--", linewidth=1)
            acc.text(epochs[i] - 0.45, acc.get_ylim()[0], f" phase {phases[i]}", fontsize=8, color="gray",
                     va="bottom")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig, plt)


def sweep_png(trials: list[dict], params: list[str], epochs: int, title: str = "") -> bytes:
    """A sweep: val top-1 per epoch of every trial (trials stopped early end where they stopped, marked x), and the
    best val top-1 of each trial against each searched parameter. trials: {name, history, params, status}."""
    plt = _figure()
    cols = 1 + len(params)
    fig, axes = plt.subplots(1, cols, figsize=(5.2 * cols, 4.2), squeeze=False)
    ax = axes[0][0]
    for t in trials:
        hist = t.get("history") or []
        if not hist:
            continue
        xs, ys = [h["epoch"] for h in hist], [100 * h["val_top1"] for h in hist]
        (line,) = ax.plot(xs, ys, "o-", linewidth=1.2, markersize=3, label=t["name"][-8:])
        if len(hist) < epochs:
            ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), markersize=9)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="trials (x: stopped early)", xlim=(0.5, epochs + 0.5))
    ax.set_xticks(range(1, epochs + 1))
    ax.grid(alpha=0.3)
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    for i, key in enumerate(params, start=1):
        ax = axes[0][i]
        pts = [(t["params"].get(key), 100 * max(h["val_top1"] for h in t["history"])) for t in trials
               if t.get("history") and t["params"].get(key) is not None]
        numeric = pts and all(isinstance(v, (int, float)) for v, _ in pts)
        if numeric:
            ax.scatter([v for v, _ in pts], [b for _, b in pts])
            positive = all(v > 0 for v, _ in pts)
            if positive and max(v for v, _ in pts) / min(v for v, _ in pts) > 20:
                from matplotlib.ticker import LogLocator, NullFormatter

                ax.set_xscale("log")
                # decades only: the minor labels (3x10^-4, 4x10^-4, ...) overlap into an unreadable band
                ax.xaxis.set_major_locator(LogLocator(base=10))
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            labels = sorted({str(v) for v, _ in pts})
            ax.scatter([labels.index(str(v)) for v, _ in pts], [b for _, b in pts])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel="best validation top-1 (%)", title=f"best top-1 vs {key}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig, plt)

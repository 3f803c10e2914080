"""W&B objects built from distrain's numbers: the confusion-matrix chart, the misclassified-images table, the trials
table. Each keeps within W&B's limits (a wandb.Table holds 10,000 rows at most).

Usage:
    from distrain.tracking.charts import confusion_chart, misclassified_table, trials_table
    run.log({"val/confusion_matrix": confusion_chart(confusion, class_names)})
"""

from __future__ import annotations

import json
from typing import Any

# Confusion matrices above this many cells keep only their non-zero cells (wandb.Table holds 10,000 rows at most).
MAX_TABLE_ROWS = 10_000
# Up to this many classes, per-class accuracy is logged as one chartable scalar per class; above, as a table.
MAX_PER_CLASS_SCALARS = 100


def confusion_chart(confusion, class_names: list[str] | None = None, title: str = "Confusion matrix"):
    """W&B's confusion-matrix chart from a count matrix (rows = true class, columns = predicted)."""
    import wandb

    n = len(confusion)
    names = class_names or [f"class_{i}" for i in range(n)]
    cells = [[names[i], names[j], int(confusion[i][j])] for i in range(n) for j in range(n)]
    if len(cells) > MAX_TABLE_ROWS:  # large label sets: the non-zero cells, biggest first
        cells = sorted((c for c in cells if c[2]), key=lambda c: -c[2])[:MAX_TABLE_ROWS]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
    return wandb.plot_table("wandb/confusion_matrix/v1", table,
                            {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                            {"title": title})


def _as_image(array):
    import numpy as np

    img = np.asarray(array)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)  # CHW from a loader that did not transpose
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return img


def misclassified_table(rows, class_names: list[str] | None = None):
    """The table of misclassified validation images, most confident mistakes first."""
    import wandb

    def name(i: int) -> str:
        return class_names[i] if class_names and 0 <= i < len(class_names) else str(i)

    table = wandb.Table(columns=["image", "key", "true", "predicted", "confidence"])
    for confidence, key, image, true, pred in sorted(rows, key=lambda r: -r[0]):
        caption = f"true {name(int(true))}, predicted {name(int(pred))} ({float(confidence):.2f})"
        table.add_data(wandb.Image(_as_image(image), caption=caption), str(key), name(int(true)), name(int(pred)),
                       float(confidence))
    return table


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def _cell_type(values: list) -> type:
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {int, bool}:
        return int if int in kinds else bool
    if kinds and kinds <= {int, float}:
        return float
    return str


def trials_table(rows: list[dict[str, Any]]):
    """A wandb.Table with one row per trial; columns are the union of the rows' (flattened) keys."""
    import wandb

    flat = [_flatten(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns.extend(k for k in r if k not in columns)
    types = {c: _cell_type([_cell(r.get(c)) for r in flat]) for c in columns}
    data = []
    for r in flat:
        line = []
        for c in columns:
            v = _cell(r.get(c))
            line.append(v if v is None or types[c] is not str else str(v))
        data.append(line)
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)

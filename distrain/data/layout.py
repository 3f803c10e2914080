"""Where a sample's label and image are: the manifest's `layout`, shared by the loader and the indexer.

Usage:
    from distrain.data.layout import label_of, image_of
    label_of(sample, "json:label")     # ('json:label', 'cat'); label_of(sample, "") tries cls, label, target
    image_of(sample, "")               # 'jpg' (the first of IMAGE_KEYS present), or None

distrain's own shards: an integer `.cls` and a `.jpg`/`.png`. Shards other tools wrote (`distrain shards index`):
`.cls`/`.label`/`.target`/`.txt` holding an integer or a class name, or a field of the `.json` sidecar
(img2dataset's metadata), and whichever image key the tool used.
"""

from __future__ import annotations

import json
from typing import Any

from distrain.images import IMAGE_KEYS

LABEL_KEYS = ("cls", "label", "target")


def label_of(sample: dict, label: str = "") -> tuple[str, Any] | None:
    """(the label spec that matched, its raw value: int or str) of a sample; None when it has none.
    label: cls | label | target | txt | json:FIELD (dotted for nested fields) | "" (the first of LABEL_KEYS)."""
    if label.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            return None
        try:
            value: Any = json.loads(raw)
        except ValueError:
            return None
        for part in label.split(":", 1)[1].split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return None
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        return label, value
    for key in (label,) if label else LABEL_KEYS:
        raw = sample.get(key)
        if raw is None:
            continue
        text = raw.decode("utf-8", "replace").strip()
        return key, int(text) if text.lstrip("-").isdigit() else text
    return None


def image_of(sample: dict, image_key: str = "") -> str | None:
    """The sample's image key: `image_key` if given, else the first of IMAGE_KEYS present; None if none."""
    if image_key:
        return image_key if image_key in sample else None
    return next((e for e in IMAGE_KEYS if e in sample), None)

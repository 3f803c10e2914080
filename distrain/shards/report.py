"""Plain-text tables about a shards folder: the build summary and `distrain shards inspect`.

Usage:
    from distrain.shards.report import build_summary, inspect_text
    print(build_summary(result.manifest, result.figures()))
    print(inspect_text(load_manifest("data/pets"), class_counts=None, max_skipped=20))
"""

from __future__ import annotations

from collections import Counter

from distrain.shards.manifest import Manifest


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def table(rows: list[list], header: list[str]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def split_table(manifest: Manifest) -> str:
    rows = []
    for name, s in manifest.splits.items():
        sizes = [sh.bytes for sh in s.shards]
        counts = [sh.num_samples for sh in s.shards]
        rows.append([name, s.num_samples, len(s.shards),
                     f"{min(counts)}/{round(sum(counts) / len(counts))}/{max(counts)}" if counts else "-",
                     human_bytes(sum(sizes) / len(sizes)) if sizes else "-", human_bytes(sum(sizes))])
    return table(rows, ["split", "samples", "shards", "samples/shard min/mean/max", "mean shard", "total"])


def class_table(manifest: Manifest, class_counts: dict[str, list[int]] | None = None) -> str:
    counts = class_counts or {k: s.class_counts for k, s in manifest.splits.items() if s.class_counts}
    if not counts:
        return "class counts: not in the manifest (run with --verify to count them from the shards)"
    splits = list(counts)
    rows = [[f"{i} {name}"] + [counts[s][i] for s in splits] for i, name in enumerate(manifest.classes)]
    rows.append(["total"] + [sum(counts[s]) for s in splits])
    return table(rows, ["class", *splits])


def skipped_text(manifest: Manifest, max_skipped: int = 20) -> str:
    lines = []
    if manifest.skipped:
        reasons = Counter(s["reason"].split(":")[0] for s in manifest.skipped)
        lines.append(f"skipped {len(manifest.skipped)} input(s) that did not decode: "
                     + ", ".join(f"{n} {r}" for r, n in reasons.most_common()))
        for s in manifest.skipped[:max_skipped or None]:
            lines.append(f"  {s['path']}  ({s.get('split', '?')}): {s['reason']}")
        if max_skipped and len(manifest.skipped) > max_skipped:
            more = len(manifest.skipped) - max_skipped
            lines.append(f"  ... and {more} more (all are listed in manifest.json)")
    else:
        lines.append("skipped: none")
    if manifest.ignored:
        lines.append("ignored: " + ", ".join(f"{n} {r}" for r, n in sorted(manifest.ignored.items())))
    return "\n".join(lines)


def build_summary(manifest: Manifest, figures: dict) -> str:
    workers = f"{figures['workers']} worker{'s' if figures['workers'] != 1 else ''}"
    last = (f"{sum(figures['samples'].values())} samples, {manifest.num_classes} classes, "
            f"{human_bytes(figures['bytes'])} in {figures['seconds']:.1f} s ({figures['images_per_s']:.0f} "
            f"images/s with {workers}) → {figures['out']}")
    return "\n".join([split_table(manifest), "", skipped_text(manifest, max_skipped=10), "", last])


def inspect_text(manifest: Manifest, class_counts: dict[str, list[int]] | None = None,
                 max_skipped: int = 20) -> str:
    head = (f"{manifest.location or '.'}: {manifest.num_classes} classes, format {manifest.format}, "
            f"source {manifest.source or '?'}, created {manifest.created or '?'}")
    return "\n".join([head, "", class_table(manifest, class_counts), "", split_table(manifest), "",
                      skipped_text(manifest, max_skipped)])

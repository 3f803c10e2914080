"""The README's generated blocks: the config reference, the augmentation table and the results table.

Usage:
    python -m distrain.readme            # rewrite the blocks in README.md (make readme)
    python -m distrain.readme --check    # exit 1 if README.md is out of date (the test suite runs this check)

A block sits between `<!-- NAME:start -->` and `<!-- NAME:end -->`; its text comes from the code that defines
it, so the README cannot drift from the config tree or the augmentation mapping.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# The README of the project in the current folder (the repository root), not of where distrain is installed: the
# generator runs the same from a checkout and from an installed wheel.

def _config_reference(folder: Path) -> str:
    from distrain.config import reference_markdown

    return reference_markdown().rstrip()


def _aug_table(folder: Path) -> str:
    from distrain.data import aug_table

    return aug_table().rstrip()


def _results(folder: Path) -> str:
    """The summary table of BENCHMARKS.md (written by `make bench`), or a pointer to it."""
    bench = folder / "BENCHMARKS.md"
    if not bench.exists():
        return "Run `make bench` to measure; it writes `BENCHMARKS.md`."
    text = bench.read_text()
    match = re.search(r"<!-- summary:start -->\n(.*?)<!-- summary:end -->", text, re.S)
    body = match.group(1).rstrip() if match else ""
    return (body + "\n\nDetails, the machine and how to rerun: [BENCHMARKS.md](BENCHMARKS.md).").lstrip()


BLOCKS = {"config-reference": _config_reference, "aug-table": _aug_table, "results": _results}


def render(text: str, folder: Path | None = None) -> str:
    """`text` (a README) with its generated blocks made anew; BENCHMARKS.md is read from `folder` (default: here)."""
    folder = Path(folder or Path.cwd())
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> block")
        body = make(folder)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    parser.add_argument("--path", default="README.md", help="the README to check or rewrite (default: ./README.md)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    current = path.read_text()
    wanted = render(current, path.absolute().parent)
    if args.check:
        if wanted != current:
            print(f"{path} is out of date: run `make readme`", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

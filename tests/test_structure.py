"""The package's shape: data flows one way, no import cycles, Ray's and timm's internals behind one adapter, modules
a newcomer can read in one sitting (≤ 450 lines), and a step core that runs without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The flow: a module may import its own layer and the layers before it. Base modules serve everyone; tracking,
# inference and launch are at the edges (they use the flow, nothing in the flow uses them, except that training and
# sweeps log to tracking); cli, demo, benchmarks and readme are entry points that nothing imports.
LAYERS = [
    ("base", ["distrain", "distrain._compat", "distrain.config", "distrain.console", "distrain.device",
              "distrain.figures", "distrain.images", "distrain.metrics", "distrain.redact", "distrain.runtime",
              "distrain.storage", "distrain.validation"]),
    ("shards", ["distrain.shards"]),
    ("data", ["distrain.data"]),
    ("models", ["distrain.models"]),
    ("tracking", ["distrain.tracking"]),
    ("train", ["distrain.train"]),
    ("tune", ["distrain.tune"]),
    ("edges", ["distrain.inference", "distrain.launch"]),
    ("entry", ["distrain.cli", "distrain.demo", "distrain.benchmarks", "distrain.readme", "distrain.__main__"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "distrain").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = i, len(prefix)
    assert best is not None, f"{name} is in no layer"
    return best


def imports(path: Path, name: str) -> set[str]:
    """distrain modules `path` imports, function-level imports included."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    mods = modules()
    out = set()
    for target in found:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name and target.startswith("distrain"):
            out.add(target)
    return out


def test_no_module_imports_one_above_it_in_the_flow():
    wrong = []
    for name, path in modules().items():
        if name in ("distrain", "distrain.__main__"):
            continue
        mine = layer_of(name)
        for target in imports(path, name):
            if target == "distrain":
                continue
            theirs = layer_of(target)
            if theirs > mine or (LAYERS[theirs][0] == "entry" and not name.startswith("distrain.cli")):
                wrong.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert wrong == []


def test_no_import_cycles_private_apis_in_one_module_and_short_modules():
    mods = modules()
    packages = {n for n, p in mods.items() if p.name == "__init__.py"}  # a package's face re-exports its children
    edges = {n: imports(p, n) - packages for n, p in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in mods if a not in packages for b in reach(a)
                     if b != a and a in reach(b)})
    assert cycles == []
    private = {}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for t in targets:
                if t.split(".")[0] in ("ray", "timm") and any(part.startswith("_") for part in t.split(".")[1:]):
                    private.setdefault(name, set()).add(t)
    assert set(private) <= {"distrain._compat"}, private
    long = {n: len(p.read_text().splitlines()) for n, p in mods.items() if len(p.read_text().splitlines()) > 450}
    assert long == {}


def test_the_step_core_imports_no_ray():
    """The per-worker setup and Stepper run under plain torch.distributed (the GPU check machine has no Ray)."""
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now fails
            "import distrain.train.core, distrain.data, distrain.models\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

"""`distrain demo [--quick]`: the whole product on Fashion-MNIST on this machine (what `make demo` runs)."""

from distrain.cli import emit_json


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="a tiny subset, one epoch per trial (about 1 minute)")
    parser.add_argument("--root", default=".", help="project folder holding configs/ (default: .)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show Ray's own output on the console too")


def run(args) -> int:
    from distrain import runtime
    from distrain.demo import run_demo

    runtime.set_console(verbose=args.verbose)

    report = run_demo(args.root, quick=args.quick)
    emit_json(report)
    return 0

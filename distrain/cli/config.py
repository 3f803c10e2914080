"""`distrain config [--config F] [--set k=v]` prints the resolved config; `--reference` the field reference."""

from distrain.config.args import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--reference", action="store_true", help="print the config reference (Markdown)")


def run(args):
    from distrain.config import reference_markdown, to_yaml

    print(reference_markdown() if args.reference else to_yaml(config_from_args(args)), end="")
    return 0

r"""Command line: ``python -m tpp_plugin <command> ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int`` (the exit code); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("tpp_plugin.demo", "accuracy vs T on sklearn digits: IF vs TPP"),
    "bench": ("tpp_plugin.bench", "time TPPNode vs IFNode, clone and rand_like; count mode"),
    "reproduce": ("tpp_plugin.reproduce", "the paper's experiment: accuracy vs T, IF/perm/TPP"),
    "run": ("tpp_plugin.runner", "run an unmodified script with TPP as the converters' default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tpp_plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

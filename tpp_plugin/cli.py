r"""Command line: ``python -m tpp_plugin demo``."""

from __future__ import annotations

import argparse
import sys

from .demo import DEFAULT_TS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tpp_plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="accuracy vs T on sklearn digits: IF vs TPP")
    demo.add_argument("--framework", choices=["spikingjelly", "snntorch"], default="spikingjelly")
    demo.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_TS), help="time steps")
    demo.add_argument("--epochs", type=int, default=30, help="ANN training epochs")
    demo.add_argument("--levels", type=int, default=4, help="QCFS levels L")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            Ts=args.T, epochs=args.epochs, seed=args.seed, levels=args.levels,
            framework=args.framework,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

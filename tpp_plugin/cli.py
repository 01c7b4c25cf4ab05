r"""Command line: ``python -m tpp_plugin <command> ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int`` (the exit code); this file only wires them together. Argument values are
checked while parsing (the ``type=`` helpers below, and an optional ``check_arguments(args)``
of the subcommand that raises ``ValueError``): a bad value is a usage error with exit code 2,
before any work starts.

List options (``--T 1 2 4``, ``--model``, ``--subset``, ...) follow one rule, :class:`ListOnce`:
all their values come after one flag; a flag given twice is a usage error (no value is merged
away or dropped), and so is a value repeated in a list of things to run (``--T 2 2``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .convert import check_calibration_mode


# ------------------------------------------------------------------------------------------------
# argument types: argparse turns their ArgumentTypeError into a usage error (exit code 2)
# ------------------------------------------------------------------------------------------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def positive_int(text: str) -> int:
    """An ``int`` >= 1.

    Example::

        >>> positive_int('3')
        3
        >>> positive_int('0')
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be an integer >= 1, got 0
    """
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An ``int`` >= 0.

    Example::

        >>> nonnegative_int('0')
        0
    """
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def seed_int(text: str) -> int:
    """A seed: an ``int`` in ``[0, 2**64)``."""
    value = _int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite ``float`` > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device(text: str) -> str:
    """A torch device string that this machine has (``cpu``, ``cuda``, ``cuda:1``, ...).

    Example::

        >>> device('cpu')
        'cpu'
        >>> device('gpu')
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: invalid device 'gpu': expected e.g. cpu or cuda
    """
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"invalid device {text!r}: expected e.g. cpu or cuda"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r}: use cpu or cuda")
    return text


def calibration_mode(text: str) -> str:
    """A threshold calibration mode: ``max`` or a percentile like ``99.9%``."""
    try:
        return check_calibration_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: the rule of every list option, as ``--help`` states it
LIST_RULE = "all values after one flag; the flag given twice is an error"


class ListOnce(argparse.Action):
    """A list option (``nargs='+'`` or ``'*'``) that may be given once: a second occurrence is a
    usage error instead of replacing the first's values; with ``distinct=True`` a repeated
    value is one too. Its help says so (:data:`LIST_RULE`).

    Example::

        >>> p = argparse.ArgumentParser(prog='p', exit_on_error=False)
        >>> _ = p.add_argument('--T', type=int, nargs='+', action=ListOnce, distinct=True)
        >>> p.parse_args(['--T', '1', '2']).T
        [1, 2]
        >>> p.parse_args(['--T', '1', '--T', '4'])
        Traceback (most recent call last):
        ...
        argparse.ArgumentError: argument --T: given twice: put all its values after one --T
    """

    def __init__(self, option_strings, dest, distinct: bool = False, help=None, **kwargs):
        self.distinct = distinct
        rule = LIST_RULE + ("; no value twice" if distinct else "")
        super().__init__(option_strings, dest, help=f"{help} ({rule})" if help else rule,
                         **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        flag = option_string or self.dest
        if getattr(namespace, self.dest, self.default) is not self.default:
            raise argparse.ArgumentError(
                self, f"given twice: put all its values after one {flag}")
        values = list(values)
        if self.distinct:
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise argparse.ArgumentError(
                    self, f"{repeated[0]!r} is given twice in {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


# command -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("tpp_plugin.experiments.demo", "accuracy vs T on sklearn digits: IF vs TPP"),
    "bench": ("tpp_plugin.experiments.bench",
              "time TPPNode vs IFNode, clone and rand_like; count mode"),
    "reproduce": ("tpp_plugin.experiments.reproduce",
                  "the paper's experiment: accuracy vs T, IF/perm/TPP; "
                  "or calibration recipes side by side (--calibration)"),
    "run": ("tpp_plugin.runner", "run an unmodified script with TPP as the converters' default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tpp_plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_subparser=command)
        importlib.import_module(module).add_arguments(command)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check a command line; a bad value exits with a usage error (code 2)."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    check = getattr(module, "check_arguments", None)
    if check is not None:
        try:
            check(args)
        except ValueError as exc:
            args._subparser.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

r"""``python -m tpp_plugin run``: run an unmodified script with TPP as the converters' default.

::

    python -m tpp_plugin run --neuron tpp [--calibrate [K=V ...]] [--neuron-kwargs K=V ...] \
        SCRIPT [ARGS...]

The script runs as ``__main__`` (like ``python SCRIPT ARGS...``: ``sys.argv`` is
``[SCRIPT, *ARGS]``, the script's folder is first on ``sys.path``) with the plugin registered and
:func:`tpp_plugin.registry.default_neuron` active, so every converter it calls without
``neuron=`` — SpikingJelly's ``RateCodingRecipe(loader)`` (2.x), ``Converter(loader)``
(0.0.0.0.14), the plugin's snnTorch ``convert`` — builds the chosen neuron instead of its own.
The script's exit code is the command's exit code; afterwards ``sys.argv``, ``sys.path``, the
default neuron and any registration the runner made are restored.

``--neuron-kwargs`` must be the runner's last option: every ``K=V`` after it up to the first word
without ``=`` (the script) is a neuron argument. Values are Python literals when they parse as
one (``seed=0`` → ``0``, ``v_init=0.5``, ``T=None``) and strings otherwise (``count=exact``).
A ``--`` may separate the runner's options from the script.

``--calibrate`` makes every conversion by a threshold recipe (SpikingJelly 2.x
``RateCodingRecipe``, ``LocalThresholdBalancingRecipe``; 0.0.0.0.14 ``Converter``) a conversion
by the calibration for ``T`` on the recipe's own data loader (``default_neuron(...,
calibrate=...)``); its ``K=V`` items are options of
:func:`~tpp_plugin.calibration.calibrate_for_T` (``max_samples=512``, ``finetune_epochs=2``, and
``T`` where the neurons have none: ``--neuron if``). One line on stderr per replaced conversion;
a recipe it cannot replace stops the script with an error naming it (exit code 1).
"""

from __future__ import annotations

import ast
import os
import runpy
import sys
import traceback

from . import registry
from .calibration.switch import calibration_request

__all__ = ["parse_neuron_kwargs", "split_command", "run_script", "add_arguments", "main"]


def parse_neuron_kwargs(items) -> dict:
    """``['seed=0', 'count=exact']`` → ``{'seed': 0, 'count': 'exact'}``.

    :raises ValueError: for an item without ``=``, with an empty key, or a key given twice
    """
    kwargs, given = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"neuron argument {item!r} is not of the form KEY=VALUE")
        if key in given:
            raise ValueError(f"--neuron-kwargs: {key} is given twice ({given[key]!r} and "
                             f"{item!r}); give each neuron argument once")
        given[key] = item
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def split_command(neuron_kwargs, command) -> tuple[list, list]:
    """Separate ``K=V`` items from ``SCRIPT ARGS...``.

    ``--neuron-kwargs`` takes the rest of the command line, so the script may still sit in its
    list: everything from the first item without ``=`` on is the command.

    :return: ``(kwarg_items, [SCRIPT, *ARGS])``
    """
    items, rest = [], []
    pending = list(neuron_kwargs or [])
    for i, item in enumerate(pending):
        if item == "--" or "=" not in item or item.startswith("-"):
            rest = pending[i:]
            break
        items.append(item)
    rest = rest + list(command or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    return items, rest


def _exit_code(code) -> int:
    # what the interpreter does with SystemExit(code)
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _say_if_nothing_replaced(request) -> None:
    """``--calibrate`` on a script that converted nothing with a threshold recipe: say so."""
    if request is not None and not request.replaced:
        print("tpp_plugin: --calibrate replaced no conversion: the script converted nothing with "
              "RateCodingRecipe, LocalThresholdBalancingRecipe or SpikingJelly 0.0.0.0.14's "
              "Converter", file=sys.stderr, flush=True)


def run_script(script: str, args=(), neuron: str = "tpp", *, calibrate=None,
               **neuron_kwargs) -> int:
    r"""Run ``script`` as ``__main__`` with ``neuron`` as the converters' default; return its exit
    code.

    :param script: path of a Python file
    :param args: its command-line arguments (``sys.argv[1:]``)
    :param neuron: ``'tpp'`` or ``'if'``
    :param calibrate: ``None``, ``True`` or a dict of calibration options: the threshold
        recipes convert by the calibration for ``T`` (see :func:`tpp_plugin.default_neuron`)
    :param neuron_kwargs: the neuron's arguments (see :func:`tpp_plugin.registry.default_neuron`)
    :return: ``0`` when the script ends normally, the code of a ``SystemExit`` it raises, ``1``
        for an uncaught exception (its traceback is printed, as Python would)
    :raises ValueError: unknown neuron name
    :raises FileNotFoundError: no such script

    Example::

        >>> import os, tempfile
        >>> script = os.path.join(tempfile.mkdtemp(), 'script.py')
        >>> with open(script, 'w') as f:
        ...     _ = f.write('import sys\n'
        ...                 'from tpp_plugin.registry import current_default_neuron\n'
        ...                 'print(sys.argv[1:], current_default_neuron())\n')
        >>> run_script(script, ['--time-steps', '8'], neuron='tpp', seed=0, T=8)
        ['--time-steps', '8'] ('tpp', {'seed': 0, 'T': 8})
        0
    """
    registry.check_neuron_name(neuron)
    if not os.path.isfile(script):
        raise FileNotFoundError(f"no such script: {script}")
    before = set(registry.registered())
    added = [name for name in registry.register() if name not in before]
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    request = None
    try:
        with registry.default_neuron(neuron, calibrate=calibrate, **neuron_kwargs):
            request = registry.current_default_calibration()
            runpy.run_path(script, run_name="__main__")
        _say_if_nothing_replaced(request)
        return 0
    except SystemExit as exc:
        if exc.code in (None, 0):
            _say_if_nothing_replaced(request)
        return _exit_code(exc.code)
    except Exception:  # the script's own failure: report it like the interpreter, exit code 1
        traceback.print_exc()
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if added:  # (unregister() with no names would undo every registration)
            registry.unregister(added)


def add_arguments(parser) -> None:
    """Options of ``python -m tpp_plugin run``."""
    import argparse

    parser.add_argument(
        "--neuron", default="tpp",
        help=f"the converters' default neuron: one of {', '.join(registry.NEURON_NAMES)} "
        "(default: tpp)",
    )
    parser.add_argument(  # REMAINDER: main() hands what follows the K=V items back (_calibrate)
        "--calibrate", nargs=argparse.REMAINDER, default=None, metavar="K=V",
        help="convert with the calibration for T instead of the threshold recipes' own "
        "thresholds, on their data loaders; optional calibration options, e.g. "
        "max_samples=512 finetune_epochs=2 (T= for --neuron if)",
    )
    parser.add_argument(
        "--neuron-kwargs", nargs=argparse.REMAINDER, default=[], metavar="K=V",
        help="neuron arguments, e.g. seed=0 count=exact T=16, each KEY once; must come last, "
        "before SCRIPT",
    )
    parser.add_argument(  # (dest "command" is taken: it names the subcommand)
        "script_command", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...]",
        help="the Python script to run, and its arguments",
    )


def _calibrate(args):
    """``--calibrate`` takes the rest of the command line (so that ``--calibrate SCRIPT`` works):
    keep its leading ``K=V`` items as the calibration options and parse what follows again —
    the runner's other options, or the script. Return the options (``None`` without
    ``--calibrate``)."""
    if args.calibrate is None:
        return None
    items, rest = [], list(args.calibrate)
    while rest and rest[0] != "--" and "=" in rest[0] and not rest[0].startswith("-"):
        items.append(rest.pop(0))
    if rest and rest[0].startswith("-") and rest[0] != "--":
        after_dashes = list(args.script_command or [])  # what followed a '--' (argparse split)
        args.calibrate = None
        args._subparser.parse_args(rest, namespace=args)  # the options after --calibrate
        if args.calibrate is not None:
            raise ValueError("--calibrate is given twice")
        args.script_command = list(args.script_command or []) + after_dashes
    else:
        args.script_command = rest + list(args.script_command or [])
    args.calibrate = items
    return parse_neuron_kwargs(items) or True


def main(args) -> int:
    """Run the script from parsed command-line arguments; return its exit code."""
    try:
        calibrate = _calibrate(args)
    except SystemExit as exc:  # a usage error after --calibrate (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 2
    except ValueError as exc:
        print(f"python -m tpp_plugin run: error: {exc}", file=sys.stderr)
        return 2
    items, command = split_command(args.neuron_kwargs, args.script_command)
    try:
        name = registry.check_neuron_name(args.neuron)
        kwargs = parse_neuron_kwargs(items)
        calibration_request(calibrate, name, kwargs, "--calibrate")
        if not command:
            raise ValueError("no SCRIPT given: python -m tpp_plugin run --neuron tpp SCRIPT ...")
        if command[0].startswith("-"):
            raise ValueError(
                f"{command[0]!r} is not a script: put the runner's options before "
                "--neuron-kwargs, which takes everything up to SCRIPT"
            )
        script, script_args = command[0], command[1:]
        if not os.path.isfile(script):
            if len(items) < len(args.neuron_kwargs or []) and script.isidentifier():
                # the word came from --neuron-kwargs: a neuron argument without its value
                raise ValueError(
                    f"no such script: {script} (--neuron-kwargs takes KEY=VALUE items: "
                    f"{script!r} has no value, e.g. {script}=...)")
            raise FileNotFoundError(f"no such script: {script}")
    except (TypeError, ValueError, FileNotFoundError) as exc:
        print(f"python -m tpp_plugin run: error: {exc}", file=sys.stderr)
        return 2
    return run_script(script, script_args, args.neuron, calibrate=calibrate, **kwargs)

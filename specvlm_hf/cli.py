"""`specvlm` command line: one sub-command per module in `specvlm_hf.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` (called with
the parsed arguments). Modules are imported only when the command line is built, so `import specvlm_hf`
stays light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module exposing `register(subparsers)`
COMMANDS = {
    "generate": "specvlm_hf.commands.generate",
    "bench": "specvlm_hf.commands.bench",
    "push": "specvlm_hf.commands.push",
    "demo": "specvlm_hf.commands.demo",
    "train": "specvlm_hf.commands.train",
    "distill-data": "specvlm_hf.commands.distill_data",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specvlm",
        description="Lossless speculative decoding for vision-language models (SpecVLM / EAGLE-2).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

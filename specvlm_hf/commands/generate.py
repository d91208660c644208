"""`specvlm generate`: describe an image with the built-in mini VLM (placeholder until the mini VLM lands)."""


def register(subparsers):
    parser = subparsers.add_parser("generate", help="Generate text for an image and a prompt.")
    parser.set_defaults(func=_run)


def _run(args):
    raise SystemExit("`specvlm generate` needs the built-in mini VLM, which is not shipped yet.")

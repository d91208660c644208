"""`specvlm demo`: serve the Gradio demo locally (plain generate and SpecVLM side by side).

    specvlm demo                                          # the built-in mini VLM and its draft, on CPU
    specvlm demo --target llava-hf/llava-1.5-7b-hf --draft me/my-draft --device cuda --port 7860

Runs `specvlm_hf.demo_app`, which ships in the package (the Hugging Face Space in `spaces/specvlm-demo/` is a
thin wrapper over the same module). Needs Gradio: `pip install "specvlm-hf[demo]"`.
"""

from __future__ import annotations

import importlib.util


def register(subparsers):
    from specvlm_hf.demo_app import add_arguments

    parser = subparsers.add_parser("demo", help="Serve the Gradio demo locally.", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args):
    from specvlm_hf.errors import UserError

    if importlib.util.find_spec("gradio") is None:  # not imported here: the app sets Gradio's upload folder first
        raise UserError('The demo needs Gradio: pip install "specvlm-hf[demo]"')
    from specvlm_hf.demo_app import run_from_args

    run_from_args(args)
    return 0

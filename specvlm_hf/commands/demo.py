"""`specvlm demo`: serve the Gradio Space demo locally (plain generate and SpecVLM side by side).

    specvlm demo                                          # the built-in mini VLM and its draft, on CPU
    specvlm demo --target llava-hf/llava-1.5-7b-hf --draft me/my-draft --device cuda --port 7860

Runs `spaces/specvlm-demo/app.py` of the repository checkout (the same file a Hugging Face Space runs); its
options are the app's own. Needs `pip install "specvlm-hf[demo]"` (Gradio).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

APP_FILE = Path(__file__).resolve().parents[2] / "spaces" / "specvlm-demo" / "app.py"


def load_app(path: Path = APP_FILE):
    """The demo's `app.py` as a module (imported once; importing it loads no model and no Gradio)."""
    name = "specvlm_demo_app"
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def register(subparsers):
    parser = subparsers.add_parser(
        "demo", help="Serve the Gradio demo locally.", description=__doc__.split("\n\n")[0]
    )
    app = load_app()
    if app is not None:
        app.add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args):
    app = load_app()
    if app is None:
        raise SystemExit(
            f"The demo app was not found at {APP_FILE}: `specvlm demo` runs spaces/specvlm-demo/app.py of a source "
            "checkout of specvlm-hf (git clone, then `pip install -e \".[demo]\"`)."
        )
    if importlib.util.find_spec("gradio") is None:  # not imported here: the app sets Gradio's cache folder first
        raise SystemExit('The demo needs Gradio: pip install "specvlm-hf[demo]"')
    app.run_from_args(args)
    return 0

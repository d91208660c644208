"""The Hugging Face Space of specvlm-hf: a thin wrapper over the demo that ships in the package.

The page, its limits and its examples live in `specvlm_hf/demo_app.py` (also what `specvlm demo` runs from any
install), so the Space and the command line serve the same code. On the Space, uploads stay in this folder's
`.gradio/`; `requirements.txt` installs `specvlm-hf[demo]`.

    python app.py                                   # the built-in mini VLM and its shipped draft, on CPU
    python app.py --target llava-hf/llava-1.5-7b-hf --draft me/llava-1.5-7b-specvlm-draft --device cuda
"""

import os
from pathlib import Path

os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(__file__).resolve().parent / ".gradio"))

from specvlm_hf.demo_app import main  # noqa: E402  (after GRADIO_TEMP_DIR: Gradio reads it when imported)

if __name__ == "__main__":
    main()

"""Files saved next to a draft's weights: the remote code for `custom_generate/`.

`save_pretrained` already copies `modeling_specvlm_draft.py`, its configuration and every flat sibling they
import (transformers' `custom_object_save`). `custom_generate/` needs its own copy of the decoding modules,
since transformers loads `custom_generate/generate.py` with only the files of that folder.
"""

from __future__ import annotations

import os
import re
import shutil

_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)
_HERE = os.path.dirname(os.path.abspath(__file__))


def relative_import_closure(module_file: str) -> list[str]:
    """File names of `module_file` and every flat sibling it reaches through `from .x import` lines."""
    folder = os.path.dirname(module_file)
    seen, pending = [], [os.path.basename(module_file)]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.append(name)
        with open(os.path.join(folder, name), encoding="utf-8") as handle:
            pending.extend(f"{module}.py" for module in _RELATIVE_IMPORT.findall(handle.read()))
    return seen


def write_custom_generate(save_directory: str) -> None:
    """Writes `custom_generate/generate.py` and the modules it imports into a draft folder."""
    entry = os.path.join(_HERE, "custom_generate_entry.py")
    target_dir = os.path.join(save_directory, "custom_generate")
    os.makedirs(target_dir, exist_ok=True)
    for name in relative_import_closure(entry):
        destination = "generate.py" if name == "custom_generate_entry.py" else name
        shutil.copyfile(os.path.join(_HERE, name), os.path.join(target_dir, destination))

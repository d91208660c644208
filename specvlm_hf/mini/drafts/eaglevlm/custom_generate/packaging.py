"""Files saved next to a draft's weights: the remote code for `custom_generate/`.

`save_pretrained` already copies `modeling_specvlm_draft.py`, its configuration and every flat sibling they
import (transformers' `custom_object_save`). `custom_generate/` needs its own copy of the decoding modules,
since transformers loads `custom_generate/generate.py` with only the files of that folder.
"""

from __future__ import annotations

import hashlib
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


LOCATION_FILE = "custom_generate/draft_location.py"


def draft_location_source(location: str, config_file: str | None = None) -> str:
    """The text of `custom_generate/draft_location.py` for a draft found at `location` (a folder or a Hub repo
    id); `config_file`: the draft's `config.json`, fingerprinted so that a stale folder path is never used."""
    digest = None
    if config_file is not None:
        with open(config_file, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    return (
        '"""Where this draft\'s custom_generate loads it from (written by specvlm-hf)."""\n\n'
        f"LOCATION = {location!r}\nCONFIG_SHA256 = {digest!r}\n"
    )


def write_custom_generate(save_directory: str, location: str | None = None) -> None:
    """Writes `custom_generate/generate.py`, the modules it imports, and where the draft lives: `location` (a Hub
    repo id, or `package:<package>/<folder>` for a draft shipped inside an installed package), by default this
    folder, fingerprinted by its `config.json`."""
    entry = os.path.join(_HERE, "custom_generate_entry.py")
    target_dir = os.path.join(save_directory, "custom_generate")
    os.makedirs(target_dir, exist_ok=True)
    for name in relative_import_closure(entry):
        destination = "generate.py" if name == "custom_generate_entry.py" else name
        shutil.copyfile(os.path.join(_HERE, name), os.path.join(target_dir, destination))
    folder = os.path.abspath(save_directory)
    source = (
        draft_location_source(folder, os.path.join(folder, "config.json"))
        if location is None
        else draft_location_source(location)
    )
    with open(os.path.join(folder, LOCATION_FILE), "w", encoding="utf-8") as handle:
        handle.write(source)

"""Where a saved draft's `custom_generate/generate.py` loads the draft from.

In the package this is a placeholder. `SpecVLMDraftModel.save_pretrained` writes a copy into the draft's
`custom_generate/` naming the folder it saved to (and a fingerprint of its `config.json`), and `specvlm push`
uploads a copy naming the Hub repo, so that `target.generate(..., custom_generate=<folder or repo>,
trust_remote_code=True)` finds its draft without being told twice.
"""

LOCATION = None  # a local folder or a Hub repo id
CONFIG_SHA256 = None  # sha256 of the draft's config.json, checked before loading from a local folder

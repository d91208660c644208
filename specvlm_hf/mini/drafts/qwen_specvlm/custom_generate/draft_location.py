"""Where this draft's custom_generate loads it from (written by specvlm-hf)."""

LOCATION = 'package:specvlm_hf/mini/drafts/qwen_specvlm'
CONFIG_SHA256 = None

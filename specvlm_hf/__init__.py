"""specvlm-hf: lossless speculative decoding (SpecVLM / EAGLE-2) for vision-language models.

    import specvlm_hf
    specvlm_hf.enable(target)                                    # once per target
    draft = SpecVLMDraftModel.from_pretrained(draft_folder)      # or AutoModel with trust_remote_code
    out = target.generate(**inputs, assistant_model=draft, max_new_tokens=128)
    print(draft.stats.sigma)

Importing the package registers the draft with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel

from .configuration_specvlm_draft import SpecVLMDraftConfig
from .integration import disable, enable, is_specvlm_draft
from .modeling_specvlm_draft import SpecVLMDraftModel, SpecVLMDraftOutput
from .round import release_fast_path
from .startup import WarmupReport, warmup
from .stats import SpecVLMStats
from .target import DraftTargetMismatchError

__version__ = "0.1.0"

AutoConfig.register(SpecVLMDraftConfig.model_type, SpecVLMDraftConfig, exist_ok=True)
AutoModel.register(SpecVLMDraftConfig, SpecVLMDraftModel, exist_ok=True)

__all__ = [
    "DraftTargetMismatchError",
    "SpecVLMDraftConfig",
    "SpecVLMDraftModel",
    "SpecVLMDraftOutput",
    "SpecVLMStats",
    "WarmupReport",
    "disable",
    "enable",
    "is_specvlm_draft",
    "release_fast_path",
    "warmup",
]

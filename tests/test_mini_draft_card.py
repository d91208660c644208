"""The shipped mini-VLM drafts carry their measured results, and a card renders them (never typed by hand)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from specvlm_hf.hub import EVAL_RESULTS_FILE, load_eval_results, render_model_card
from specvlm_hf.mini.drafts import DRAFT_NAMES, draft_path, load_draft


def test_shipped_drafts_have_valid_eval_results():
    for name in DRAFT_NAMES:
        results = load_eval_results(draft_path(name))
        assert results is not None and results.sigma > 1 and set(results.modes) == {"tree", "chain"}


def test_a_resaved_shipped_draft_gets_a_card_with_its_measured_numbers(tmp_path):
    draft = load_draft(name="eaglevlm")
    draft.save_pretrained(tmp_path)
    shutil.copy(draft_path("eaglevlm") / EVAL_RESULTS_FILE, tmp_path / EVAL_RESULTS_FILE)
    measured = json.loads((tmp_path / EVAL_RESULTS_FILE).read_text())
    card = render_model_card(tmp_path, "me/mini-eaglevlm", base_model="me/mini-vlm")
    assert f"{measured['sigma']:.2f}" in card and f"{measured['speedup']:.2f}" in card
    assert "base_model: me/mini-vlm" in card


def test_shipped_drafts_are_complete_folders_with_current_remote_code():
    """Each shipped draft carries the remote code and `custom_generate/` a saved draft has: in the checkout, links to
    the package's modules (a wheel stores their contents); if this fails after adding a module:
    `from specvlm_hf.mini.drafts import refresh_shipped_files`."""
    import specvlm_hf

    package = Path(specvlm_hf.__file__).parent
    for name in DRAFT_NAMES:
        folder = draft_path(name)
        copies = list(folder.glob("*.py")) + [
            p for p in (folder / "custom_generate").glob("*.py") if p.name not in ("generate.py", "draft_location.py")
        ]
        assert len(copies) > 10, name
        for copy in copies:
            assert copy.is_symlink(), f"{copy} should link to the package's module, not copy it"
            assert copy.read_text() == (package / copy.name).read_text(), f"{copy} is stale"
        entry = (folder / "custom_generate" / "generate.py").read_text()
        assert entry == (package / "custom_generate_entry.py").read_text()
        assert (
            f"package:specvlm_hf/mini/drafts/{name}" in (folder / "custom_generate" / "draft_location.py").read_text()
        )


def test_custom_generate_runs_a_shipped_draft_by_its_folder():
    """`custom_generate=<shipped draft folder>` finds its draft inside the installed package and matches plain
    `generate`."""
    from specvlm_hf import disable
    from specvlm_hf.mini import EXAMPLE_IMAGE, load

    target, processor = load()
    disable(target)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    from PIL import Image

    inputs = processor(images=Image.open(EXAMPLE_IMAGE), text=prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=24, do_sample=False)
    plain = target.generate(**inputs, **kwargs)
    spec = target.generate(**inputs, **kwargs, custom_generate=str(draft_path()), trust_remote_code=True)
    assert spec.tolist() == plain.tolist()

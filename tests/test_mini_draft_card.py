"""The shipped mini-VLM drafts carry their measured results, and a card renders them (never typed by hand)."""

from __future__ import annotations

import json
import shutil

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

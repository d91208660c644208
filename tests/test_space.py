"""The Gradio Space demo (`spaces/specvlm-demo/app.py`): input limits, streaming by rounds, the stats, the files
it serves, queueing, and a headless Chromium driving the page. Runs on a tiny random LLaVA with an oracle
draft and a character-level processor saved to folders, loaded the way `--target`/`--draft` load them."""

from __future__ import annotations

import os
import shutil
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import specvlm_hf
from specvlm_hf.commands.demo import APP_FILE, load_app
from tiny_models import IMAGE_SIZE, PATCH, oracle_draft, tiny_llava

gradio = pytest.importorskip("gradio", reason='the demo needs Gradio: pip install -e ".[test]" installs it')

app = load_app()
REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO_ROOT / "docs" / "images" / "space-demo.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def tiny_processor():
    """A character-level `LlavaProcessor` for the tiny targets: vocabulary 96 with `<|end|>` as EOS (id 2) and
    `<image>` as id 95, 32x32 images with 8x8 patches (16 placeholders), the mini VLM's chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specvlm_hf.mini.tokenizer import build_processor

    special = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
    characters = list("\n " + string.ascii_letters + string.digits + ".,?!'-:;()")
    vocab = {token: index for index, token in enumerate(special + characters)}
    vocab["<image>"] = 95
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([*special, "<image>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return build_processor(fast, IMAGE_SIZE, PATCH)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo's models loaded from saved folders, as `app.py --target T --draft D` loads them."""
    root = tmp_path_factory.mktemp("space")
    target = tiny_llava(seed=1, scale=32.0)
    target.save_pretrained(root / "target")
    tiny_processor().save_pretrained(root / "target")
    oracle_draft(target).save_pretrained(root / "draft")
    loaded = app.load_models(str(root / "target"), str(root / "draft"))
    specvlm_hf.enable(loaded.target)
    return loaded


def example(name="example.png"):
    return str(app.EXAMPLES_DIR / name)


def run_to_end(models, image, prompt="Describe this image.", max_new_tokens=48):
    return list(app.compare(models, image, prompt, max_new_tokens))


# ---- models ----


def test_default_models_say_what_is_missing_until_the_mini_draft_ships(monkeypatch):
    from specvlm_hf import mini

    monkeypatch.delattr(mini, "DRAFT_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="--target .* --draft"):
        app.default_models()


def test_a_draft_without_its_target_is_refused():
    with pytest.raises(ValueError, match="both --target and --draft"):
        app.load_models(draft="some/draft")


# ---- input limits ----


def test_images_of_unaccepted_format_or_size_are_refused_with_the_limit(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "picture.tiff")
    with pytest.raises(app.InputError, match="TIFF images are not accepted; use one of PNG, JPEG"):
        app.check_image(tmp_path / "picture.tiff")
    Image.new("RGB", (app.MAX_IMAGE_SIDE + 1, 4 * app.MIN_IMAGE_SIDE)).save(tmp_path / "wide.png")
    with pytest.raises(app.InputError, match=f"is {app.MAX_IMAGE_SIDE + 1}x32 pixels; each side must be between"):
        app.check_image(tmp_path / "wide.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(app.InputError, match="not an image the demo can read"):
        app.check_image(tmp_path / "notes.png")
    with pytest.raises(app.InputError, match="Upload an image"):
        app.check_image(None)


def test_image_files_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "MAX_UPLOAD_MB", 0.001)
    Image.new("RGB", (64, 64)).save(tmp_path / "big.bmp")
    with pytest.raises(app.InputError, match="the limit is 0.001 MB"):
        app.check_image(tmp_path / "big.bmp")


def test_prompt_and_max_new_tokens_are_bounded():
    with pytest.raises(app.InputError, match="Type a prompt"):
        app.check_prompt("   ")
    with pytest.raises(app.InputError, match=f"the limit is {app.MAX_PROMPT_CHARS}"):
        app.check_prompt("x" * (app.MAX_PROMPT_CHARS + 1))
    assert app.check_prompt("  What is this?  ") == "What is this?"
    for bad in (0, 257, 3.5, None):
        with pytest.raises(app.InputError, match="between 1 and 256"):
            app.check_max_new_tokens(bad, 256)
    assert app.check_max_new_tokens(256.0, 256) == 256


def test_a_request_longer_than_the_models_positions_is_refused(models):
    with pytest.raises(app.InputError, match="exceeds the model's 256 positions"):
        run_to_end(models, example(), "x" * 300, max_new_tokens=10)


# ---- streaming and stats ----


def test_plain_streams_first_then_specvlm_and_the_outputs_are_identical(models):
    updates = run_to_end(models, example(), max_new_tokens=48)
    plain_done = next(i for i, (plain, _, _) in enumerate(updates) if "cursor" not in plain)
    assert all(spec == "" or "cursor" in spec for _, spec, _ in updates[:plain_done]), "SpecVLM runs second"
    assert any("cursor" in spec and "round" in spec for _, spec, _ in updates), "SpecVLM streamed partial text"
    plain, spec, stats = updates[-1]
    assert "cursor" not in plain + spec
    assert "outputs identical: **yes**" in stats
    assert models.draft.stats.new_tokens == 48


def test_specvlm_text_is_coloured_by_the_round_that_accepted_it(models):
    plain, spec, _ = run_to_end(models, example(), max_new_tokens=48)[-1]
    stats = models.draft.stats
    assert spec.count('class="round"') == stats.rounds + 1, "one band per round, plus the prefill's token"
    assert f'title="round 2: {stats.accepted_per_round[0]} token' in spec
    assert 'class="round"' not in plain
    colours = [spec.split('class="round" style="background:')[i + 1][:7] for i in range(3)]
    assert colours[0] != colours[1] != colours[2]


def test_stats_show_tokens_per_second_speedup_sigma_and_visual_branch(models):
    *_, stats = run_to_end(models, example(), max_new_tokens=48)[-1]
    assert "| tokens/s |" in stats and "..." not in stats
    assert f"**sigma {models.draft.stats.sigma:.2f}**" in stats
    assert "**speedup " in stats
    assert f"visual branch: **{getattr(models.draft.stats, 'visual_branch', None) or 'none'}**" in stats


def test_round_texts_split_the_decoded_text_without_losing_characters(models):
    tokenizer = models.processor.tokenizer
    rounds = [[40, 41], [7], [42, 43, 44]]
    assert "".join(app.round_texts(tokenizer, rounds)) == tokenizer.decode(sum(rounds, []))
    quote = app.render_rounds(tokenizer, [tokenizer.encode("it's", add_special_tokens=False)], True, False)
    assert "it&#x27;s" in quote, "model text is HTML-escaped"


# ---- the server: files and queue ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The app served on 127.0.0.1 in this process (as `app.launch` serves it), with its upload cache in a
    temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        port = free_port()
        demo = app.launch(models, host="127.0.0.1", port=port, block=False)
        yield f"http://127.0.0.1:{port}", demo
        demo.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_app_serves_no_file_outside_its_folder(server):
    url, _ = server
    assert http_status(f"{url}/gradio_api/file={app.EXAMPLES_DIR / 'example.png'}") == 200
    for outside in ("/etc/passwd", REPO_ROOT / "README.md", APP_FILE, Path(specvlm_hf.__file__)):
        assert http_status(f"{url}/gradio_api/file={outside}") in (403, 404), outside


def test_a_refused_upload_shows_the_reason_to_the_user(server, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = server
    Image.new("RGB", (32, 32)).save(tmp_path / "scan.tiff")
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="TIFF images are not accepted; use one of PNG, JPEG"):
        client.predict(handle_file(str(tmp_path / "scan.tiff")), "Describe this image.", 16, api_name="/compare")


def test_concurrent_users_are_queued_one_at_a_time(server, models, monkeypatch):
    from gradio_client import Client, handle_file

    url, _ = server
    calls, lock = [], threading.Lock()
    generate = models.target.generate

    def recording_generate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                calls.append((start, time.perf_counter()))

    monkeypatch.setattr(models.target, "generate", recording_generate)
    client = Client(url, verbose=False)
    jobs = [client.submit(handle_file(example()), "Describe this image.", 64, api_name="/compare") for _ in range(3)]
    results = [job.result(timeout=120) for job in jobs]
    assert all("outputs identical" in stats for _, _, stats in results)
    calls.sort()
    assert len(calls) == 6, "plain + SpecVLM per user"
    assert all(end <= next_start for (_, end), (next_start, _) in zip(calls, calls[1:])), "no two runs overlap"


# ---- a real browser ----

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

RECORD_UPDATES = """
() => {
  window.__panes = {plain: [], spec: []};
  const watch = (id, key) => {
    const pane = document.querySelector(id);
    new MutationObserver(() => {
      const tokens = pane.querySelector('.tokens');
      if (tokens) window.__panes[key].push({text: tokens.textContent.length, running: !!pane.querySelector('.cursor')});
    }).observe(pane, {subtree: true, childList: true, characterData: true});
  };
  watch('#plain-output', 'plain');
  watch('#specvlm-output', 'spec');
}
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `apt-get install -y chromium` (.ci/run installs it)")
def test_a_browser_submits_an_example_and_sees_both_panes_stream_and_the_stats(server):
    playwright = pytest.importorskip("playwright.sync_api", reason='pip install -e ".[test]" installs playwright')
    url, _ = server
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, wait_until="networkidle")
            page.get_by_text("How many shapes are there?").first.click()  # the second example
            page.wait_for_function("document.querySelector('#prompt textarea').value === 'How many shapes are there?'")
            page.evaluate(RECORD_UPDATES)
            page.click("#generate")
            page.wait_for_selector("#stats >> text=outputs identical", timeout=90_000)

            panes = page.evaluate("window.__panes")
            for key in ("plain", "spec"):
                assert any(update["running"] and update["text"] > 0 for update in panes[key]), f"{key} streamed"
                assert panes[key][-1]["text"] > 0 and not panes[key][-1]["running"], f"{key} finished"
            assert page.inner_text("#plain-output") == page.inner_text("#specvlm-output")
            assert page.locator("#specvlm-output .round").count() > 1
            stats = page.inner_text("#stats")
            for shown in ("tokens/s", "speedup", "sigma", "visual branch"):
                assert shown in stats, shown
            screenshot = page.screenshot(full_page=True)
            if os.environ.get("SPECVLM_UPDATE_SCREENSHOT"):
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                SCREENSHOT.write_bytes(screenshot)
        finally:
            browser.close()

"""The Gradio demo (`specvlm_hf.demo_app`, served by `specvlm demo` and by the Space's thin `app.py`): input limits,
streaming by rounds, the stats, the files it serves, queueing, and a headless Chromium driving the page. Runs on
a tiny random LLaVA with an oracle draft and a character-level processor saved to folders, loaded the way
`--target`/`--draft` load them; the examples are checked on the mini VLM itself."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import specvlm_hf
from specvlm_hf import demo_app as app
from tiny_models import IMAGE_SIZE, PATCH, oracle_draft, tiny_llava

gradio = pytest.importorskip("gradio", reason='the demo needs Gradio: pip install -e ".[test]" installs it')

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACE_APP = REPO_ROOT / "spaces" / "specvlm-demo" / "app.py"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
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


def example(index=0):
    return str(app.EXAMPLES_DIR / app.EXAMPLES[index][0])


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
    assert len(set(colours)) == 3, "three neighbouring rounds, three colours"


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
    assert http_status(f"{url}/gradio_api/file={example()}") == 200
    for outside in (
        "/etc/passwd",
        REPO_ROOT / "README.md",
        SPACE_APP,
        Path(app.__file__),
        Path(specvlm_hf.__file__),
        app.EXAMPLES_DIR / "examples.json",
    ):
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
      if (tokens) window.__panes[key].push({text: tokens.textContent.length, \
running: !!pane.querySelector('.cursor')});
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
            second = app.EXAMPLES[1][1]
            page.get_by_text(second).first.click()  # the second example
            page.wait_for_function(f"document.querySelector('#prompt textarea').value === {json.dumps(second)}")
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
        finally:
            browser.close()


# ---- one program: the package's demo, the Space's wrapper and `specvlm demo`


def test_the_space_app_is_a_thin_wrapper_over_the_packaged_demo():
    spec = importlib.util.spec_from_file_location("space_app", SPACE_APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is app.main
    assert len(SPACE_APP.read_text().splitlines()) < 25


def test_the_examples_ship_in_the_package():
    assert [name for name, _ in app.EXAMPLES] == ["scene-7070-60.png", "colour-7070-165.png"]
    assert all((app.EXAMPLES_DIR / name).is_file() for name, _ in app.EXAMPLES)
    assert app.EXAMPLES_DIR.parent == Path(specvlm_hf.__file__).parent


def test_the_mini_vlm_answers_the_examples_correctly():
    """Each example's answer is the one `benchmarks/pick_demo_examples.py` checked against the drawn scene."""
    import sys

    from specvlm_hf.commands.generate import run_generate
    from specvlm_hf.mini import data, load

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from pick_demo_examples import CHECKS

    model, processor = load()
    for entry in json.loads((app.EXAMPLES_DIR / "examples.json").read_text()):
        image = app.check_image(app.EXAMPLES_DIR / entry["image"])
        answer, _ = run_generate(model, processor, image, entry["prompt"], max_new_tokens=128)
        assert answer.strip() == entry["answer"], entry["image"]
        scene = data.Scene(
            tuple(data.Shape(**shape) for shape in entry["scene"]["shapes"]), entry["scene"]["background"]
        )
        task = entry["image"].split("-")[0]
        target = {"colour": scene.shapes[-1].colour}.get(task)  # the triangle the colour example asks about
        assert CHECKS[task](answer.strip(), scene, target) == [], entry


def test_the_demo_uses_the_shared_mode_rule_chain_on_the_cpu(models, tmp_path):
    from specvlm_hf.cli import build_parser

    root = Path(models.target.name_or_path).parent
    args = build_parser().parse_args(
        ["demo", "--target", str(root / "target"), "--draft", str(root / "draft"), "--device", "cpu"]
    )
    assert app.models_from_args(args).draft.config.decoding_mode == "chain"
    args.mode = "tree"
    assert app.models_from_args(args).draft.config.decoding_mode == "tree"


def test_sigma_is_shown_once_with_the_counts_it_is_made_of(models):
    *_, stats = run_to_end(models, example(), max_new_tokens=48)[-1]
    draft = models.draft.stats
    accepted = sum(draft.accepted_per_round)
    assert f"| sigma | 1.00 | {draft.sigma:.2f} ({accepted} tokens / {draft.rounds} rounds) |" in stats
    assert f"| target forwards | 48 | {draft.rounds + 1} (prefill + {draft.rounds} rounds) |" in stats
    assert accepted == 48 - 1, "every token but the prefill's came from a round"
    assert stats.count("sigma ") == 1 + stats.count("| sigma |"), "no second, differently computed sigma"


def test_a_non_image_upload_gets_a_plain_message_without_the_servers_path(server, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = server
    (tmp_path / "notes.png").write_text("not an image")
    client = Client(url, verbose=False)
    with pytest.raises(Exception) as refused:
        client.predict(handle_file(str(tmp_path / "notes.png")), "Describe this image.", 16, api_name="/compare")
    message = str(refused.value)
    assert "This file is not an image the demo can read; use one of PNG, JPEG" in message
    assert "/" not in message.split("read;")[0] and "gradio" not in message.lower(), message


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--max-new-tokens-limit", "0"],
            "argument --max-new-tokens-limit: must be a whole number of at least 1, got 0",
        ),
        (["--draft", "me/draft"], "Pass both --target and --draft"),
    ],
)
def test_demo_argument_errors_are_one_line(capsys, argv, message):
    from specvlm_hf.cli import main

    status = main(["demo", *argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and message in lines[0], lines

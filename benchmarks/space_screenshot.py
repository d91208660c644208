"""Take `docs/images/space-demo.png`: the demo on the built-in mini VLM and its shipped draft, driven by headless
Chromium on the first example (a scene the mini VLM describes correctly, see `benchmarks/pick_demo_examples.py`).

    python benchmarks/space_screenshot.py --out docs/images/space-demo.png      # needs Chromium (apt install chromium)

Runs the page exactly as `specvlm demo` does (same models, same decoding-mode rule: chain on the CPU), clicks
the first example, presses Generate, waits for the stats and saves a full-page screenshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/images/space-demo.png")
    parser.add_argument("--example", type=int, default=0, help="Which example to click (default: the first).")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="specvlm-demo-uploads-"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from playwright.sync_api import sync_playwright

    from specvlm_hf import demo_app
    from specvlm_hf.cli import build_parser

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("No Chromium found: apt-get install -y chromium")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    models = demo_app.models_from_args(build_parser().parse_args(["demo", "--device", "cpu"]))
    demo_app.warm_up(models)
    server = demo_app.launch(models, "127.0.0.1", port, block=False)
    name, prompt = demo_app.EXAMPLES[args.example]
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(f"http://127.0.0.1:{port}", wait_until="networkidle")
            page.locator("#examples").get_by_text(prompt).first.click()
            page.wait_for_function(
                "document.querySelector('#prompt textarea').value !== '' && document.querySelector('img') !== null"
            )
            page.wait_for_timeout(1000)
            page.click("#generate")
            page.wait_for_selector("#stats >> text=outputs identical", timeout=180_000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            print(page.inner_text("#specvlm-output"))
            print(page.inner_text("#stats"))
            browser.close()
    finally:
        server.close()
    print(f"wrote {args.out} ({name}: {prompt!r})")


if __name__ == "__main__":
    main()

"""English sentences for the mini VLM's text tasks, taken from the Python documentation topics.

CPython ships the language reference's topics as plain text in `pydoc_data.topics` (used by `help()`),
so a real English corpus is available offline everywhere. Its exact text changes between Python
versions, so the sentences are extracted once (`python -m specvlm_hf.mini.corpus`) and frozen in
`assets/pydoc_corpus.json`; the data generator reads only the frozen file, which makes a dataset a
function of its seed alone.
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

CORPUS_PATH = Path(__file__).parent / "assets" / "pydoc_corpus.json"

_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\"'][.!?])\s+(?=[A-Z\"'(])")
_TITLE_UNDERLINE = re.compile(r"^[*=\-~^]+$")


def _ascii(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("\u2014", " - ").replace("\u2013", "-").replace("\u2026", "...")
    text = unicodedata.normalize("NFKD", text)
    return text.encode("ascii", "ignore").decode("ascii")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text in one topic: drops code blocks, grammar rules, tables and titles."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "\t")) or _TITLE_UNDERLINE.match(line.strip()):
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    # A prose paragraph has several words, ends like a sentence and is mostly letters.
    return [
        p
        for p in paragraphs
        if len(p.split()) >= 6 and p.endswith((".", ":")) and sum(c.isalpha() for c in p) > 0.7 * len(p)
    ]


def _sentences(paragraph: str, min_chars: int = 20, max_chars: int = 400) -> list[str]:
    sentences = [s.strip() for s in _SENTENCE_END.split(re.sub(r"\s+", " ", paragraph))]
    return [s for s in sentences if min_chars <= len(s) <= max_chars and s.endswith(".") and "::" not in s]


def extract_topics() -> list[dict]:
    """Read `pydoc_data.topics` of the running Python and return its topics as sentence lists.

    Returns:
        A list of `{"name": str, "title": str, "paragraphs": list[list[str]]}`, where each paragraph is a
        list of ASCII sentences of 20-400 characters; topics without usable prose are dropped.
    """
    from pydoc_data.topics import topics

    result = []
    for name in sorted(topics):
        text = _ascii(topics[name])
        first_line = text.strip().splitlines()[0].strip()
        title = re.sub(r'"', "", first_line)
        paragraphs = [s for s in (_sentences(p) for p in _prose_paragraphs(text)) if s]
        if paragraphs:
            result.append({"name": name, "title": title, "paragraphs": paragraphs})
    return result


@lru_cache(maxsize=1)
def load_corpus() -> tuple[dict, ...]:
    """The frozen corpus shipped with the package (see `extract_topics` for the record layout)."""
    if not CORPUS_PATH.exists():
        raise FileNotFoundError(
            f"The mini VLM corpus {CORPUS_PATH} is missing; rebuild it with `python -m specvlm_hf.mini.corpus`."
        )
    return tuple(json.loads(CORPUS_PATH.read_text())["topics"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Freeze the Python documentation sentences used by the mini VLM.")
    parser.add_argument("--out", type=Path, default=CORPUS_PATH)
    args = parser.parse_args(argv)
    import sys

    topics = extract_topics()
    source = f"pydoc_data.topics of Python {sys.version_info.major}.{sys.version_info.minor}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": source, "topics": topics}, indent=0) + "\n")
    n_sentences = sum(len(p) for t in topics for p in t["paragraphs"])
    print(f"wrote {len(topics)} topics, {n_sentences} sentences from {source} to {args.out}")


if __name__ == "__main__":
    main()

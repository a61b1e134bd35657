"""The documents stay linked and true: every relative link in README.md and docs/ points at a file (and
heading) that exists, the README links every document under docs/, docs/SERVICE.md lists every
MHCFLASH_* setting, and its /info example has the keys a real /info answer has (asked over HTTP)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from service.settings import ServiceSettings
from service.testing import serve_in_thread, tiny_settings

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> hyphens."""
    text = FENCE.sub("", markdown)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_relative_links_resolve():
    bad = []
    for doc in [REPO / "README.md", *DOCS]:
        for target in LINK.findall(FENCE.sub("", doc.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_readme_links_every_document():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(DOCS) >= 9
    missing = [d.name for d in DOCS if f"](docs/{d.name})" not in readme]
    assert not missing, f"README does not link {missing}"


def test_service_doc_lists_every_setting():
    doc = (REPO / "docs" / "SERVICE.md").read_text(encoding="utf-8")
    missing = [f"MHCFLASH_{name.upper()}" for name in ServiceSettings.model_fields
               if f"`MHCFLASH_{name.upper()}`" not in doc]
    assert not missing, f"docs/SERVICE.md's settings table lacks {missing}"


def test_service_doc_info_example_has_the_real_keys(tiny_weights):
    doc = (REPO / "docs" / "SERVICE.md").read_text(encoding="utf-8")
    example = json.loads(next(body for kind, body in FENCE.findall(doc) if kind == "json"))
    with serve_in_thread(tiny_settings(tiny_weights)) as srv:
        real = httpx.get(f"{srv.url}/info", timeout=60).json()

    def keys(value):
        return {k: keys(v) for k, v in value.items()} if isinstance(value, dict) else None

    assert keys(example) == keys(real)

"""Product files speak of the product: no development history, no paths outside the repository.

Two checks over tracked files (``git ls-files``):

- every tracked text file: no history words (numbered work sessions or tickets, "the user's document",
  a design document kept outside the repository, paths into a folder beside the repository). Raw
  measurement data under ``benchmarks/results/`` is exempt, and so is this file (it holds the words as
  examples); binary files are skipped.
- ``BENCHMARKS.md`` cites every file kept under ``benchmarks/results/``, and every results file it cites
  exists, so the folder holds exactly the data behind the document.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRODUCT_FILES = ["*"]
RAW_DATA = ["benchmarks/results/*"]
EXEMPT = ["tests/test_product_text.py"]  # this file: it holds the words as examples

HISTORY_WORDS = [
    r"session ?[0-9]+",
    r"sessions? [0-9]",
    r"issue ?#?[0-9]+",
    r"\buser'?s (document|card|example|design|keys|settings|spelling|block)",
    r"\bSPEC\.md\b",
    r"\.\./shared",
    r"\bshared/(data|seed)\b",
]
HISTORY = re.compile("|".join(f"(?:{p})" for p in HISTORY_WORDS), re.IGNORECASE)

RESULTS = "benchmarks/results/"
DATA_FILE = re.compile(r"\.(json|csv|png|txt|log)$")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the product-text checks read `git ls-files`")
    return out.splitlines()


def matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def history_hits(text: str) -> list[tuple[int, str]]:
    """(line number, matched words) for every history word in ``text``."""
    return [(i, m.group(0)) for i, line in enumerate(text.splitlines(), 1) for m in HISTORY.finditer(line)]


def is_text(path: Path) -> bool:
    """False for binary files (a NUL byte in the first 8 KiB: images, weights, fonts)."""
    with path.open("rb") as f:
        return b"\0" not in f.read(8192)


def test_history_words_are_found_and_product_words_are_not():
    found = history_hits("since Session 8; see issue #23\nthe user's example block\n"
                         "datasetNames ../shared/data/pdb20\nsessions 4-6, cgdms + shared/data/pdb20\n"
                         "(SPEC.md) with the user's keys; shared/seed/x.md")
    assert found == [(1, "Session 8"), (1, "issue #23"), (2, "user's example"), (3, "../shared"),
                     (4, "sessions 4"), (4, "shared/data"), (5, "SPEC.md"), (5, "user's keys"),
                     (5, "shared/seed")]
    assert history_hits("the reference configuration; 2026-11-26; the pdb20 set of 186 chains; 64 x 128; "
                        "datasetNames cgdms,pdb20; --set dataDirectory=/path/to/data; shared weights; "
                        "the shared memory pool") == []


def product_files() -> list[str]:
    """Tracked text files the check covers (every one but raw data, and this file)."""
    return [f for f in tracked_files()
            if matches(f, PRODUCT_FILES) and not matches(f, RAW_DATA + EXEMPT)
            and (ROOT / f).is_file() and is_text(ROOT / f)]


def test_product_files_have_no_history_words():
    files = product_files()
    for wanted in ("BENCHMARKS.md", "RELIABILITY.md", "configs/ship_pairfree.txt", "model/config.py",
                   "weights/mhc_flash_v1/config.txt", "tests/test_config.py"):
        assert wanted in files, wanted
    assert "weights/mhc_flash_v1/model.safetensors" not in files  # binary: skipped
    bad = [f"{f}:{line}: {words!r}" for f in files
           for line, words in history_hits((ROOT / f).read_text(encoding="utf-8", errors="replace"))]
    assert not bad, ("history words in product files (say what the product does, with dates; the history "
                     "stays in git):\n" + "\n".join(bad))


def cited_names(markdown: str) -> list[str]:
    """Data-file names in backticks, brace alternatives expanded (`a_{x,y}.json` -> a_x.json, a_y.json)."""
    def expand(token: str) -> list[str]:
        m = re.search(r"\{([^{}]*)\}", token)
        if not m:
            return [token]
        return [t for alt in m.group(1).split(",") for t in expand(token[:m.start()] + alt + token[m.end():])]

    names = [t for raw in re.findall(r"`([^`]+)`", markdown) for t in expand(raw)]
    return [t.removeprefix(RESULTS) for t in names if DATA_FILE.search(t)]


def is_cited(path: str, names: list[str]) -> bool:
    """A results file (relative to benchmarks/results/) is cited by its path or, after its folder, its name."""
    return any(fnmatch.fnmatch(path, n) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], n) for n in names)


def test_results_folder_holds_exactly_the_files_benchmarks_cites():
    results = [f.removeprefix(RESULTS) for f in tracked_files() if f.startswith(RESULTS)]
    names = cited_names((ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"))
    uncited = [f for f in results if not is_cited(f, names)]
    assert not uncited, f"{RESULTS} files not cited in BENCHMARKS.md (cite them or git rm them): {uncited}"
    # a cited name that is a results path (starts with a dated folder) or a bare file name must exist
    wanted = [n for n in names if re.match(r"\d{4}-\d\d-\d\d_", n) or "/" not in n]
    missing = [n for n in wanted if not any(is_cited(f, [n]) for f in results)]
    assert not missing, f"BENCHMARKS.md cites files missing from {RESULTS}: {missing}"

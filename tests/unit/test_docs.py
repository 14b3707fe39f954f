"""The README tells a new user what exists: quick start commands and a link to every part's page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_quick_start_is_make_demo_and_make_test() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quick_start and "make test" in quick_start


def test_every_docs_page_is_linked_and_every_link_exists() -> None:
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", README))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")} - {"docs/contracts.md"}
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"
    assert all((ROOT / link).exists() for link in linked)


def test_every_benchmark_and_stage_is_documented() -> None:
    from cryptotui.cli import BENCHMARKS
    from cryptotui.stages import STAGES

    for name in BENCHMARKS:
        assert f"cryptotui bench {name}" in README
    for name in STAGES:
        assert f"| `{name}` |" in README


def test_makefile_targets_named_in_the_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z-]+)`", README)):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"make {target} is not a target"

"""The README and docs/: local links resolve, and the two set-up commands the README gives are the ones the
Makefile and CI run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(page):
    missing = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def test_readme_set_up_commands_are_what_make_and_ci_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo " in readme and "make test " in readme
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo: install\n\t\$\(VENV\)/bin/atu demo ", makefile, re.M)
    assert re.search(r"^test: install\n\t\$\(PY\) -m pytest -q\n", makefile, re.M)
    assert re.search(r"^test-fast: install\n\t\$\(PY\) -m pytest -q -m \"not slow\"\n", makefile, re.M)
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().endswith("make test")

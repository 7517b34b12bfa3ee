"""The documentation's relative links resolve, and the README's job table matches `cluster.submit.JOBS`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.submit import JOBS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "tools").rglob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    """Link targets that name a file in the repository: no URL scheme, no pure #anchor, anchors stripped."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, ... and anchors within the page
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_parser() -> None:
    text = ("[a](docs/x.md#part) [b](https://e.org/y) [c](#top) ![d](img.png) `[e](code.md)`\n"
            "```\n[f](fenced.md)\n```\n")
    assert relative_links(text) == ["docs/x.md", "img.png"]


def job_table(text: str) -> dict[str, tuple[str, str]]:
    """The README's job table: job name -> (module, submit column), parsed from the table under `## Jobs`."""
    section = text.split("\n## Jobs\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:3] == ["job", "module", "submit"], f"the job table's columns changed: {header}"
    table = {}
    for row in rows[2:]:  # after the header and its --- line
        name, module, submit = (cell.strip().strip("`") for cell in row.strip("|").split("|")[:3])
        assert name not in table, f"job {name!r} appears twice in the README's job table"
        table[name] = (module, submit)
    return table


def test_readme_job_table_matches_submit_jobs() -> None:
    table = job_table(README.read_text())
    submittable = {name for name, (_, submit) in table.items() if submit == "yes"}
    assert submittable == set(JOBS), (
        f"README job table's submit=yes rows {sorted(submittable)} differ from cluster.submit.JOBS {sorted(JOBS)}")
    for name, job in JOBS.items():
        assert table[name][0] == job.module, f"README lists {name} as {table[name][0]}, JOBS runs {job.module}"
    assert {submit for _, submit in table.values()} <= {"yes", "no"}, "the submit column holds yes or no"


def test_readme_job_table_modules_exist() -> None:
    for name, (module, _) in job_table(README.read_text()).items():
        path = ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), (
            f"README job {name!r}: module {module} has no file")

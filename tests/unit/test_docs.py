"""The documentation's relative links resolve, and the README's job table is the job registry, `conf.jobs.JOBS`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conf.jobs import JOBS

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


def job_table(text: str) -> dict[str, list[str]]:
    """The README's job table: job name -> its cells (module, submit, what it does, command), parsed from the table
    under `## Jobs`."""
    section = text.split("\n## Jobs\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["job", "module", "submit", "what it does", "command"], f"the job table's columns: {header}"
    table = {}
    for row in rows[2:]:  # after the header and its --- line
        name, module, submit, what, command = (cell.strip() for cell in row.strip("|").split("|"))
        name = name.strip("`")
        assert name not in table, f"job {name!r} appears twice in the README's job table"
        table[name] = [module.strip("`"), submit, what, command]
    return table


def test_readme_job_table_is_the_job_registry() -> None:
    table = job_table(README.read_text())
    assert list(table) == list(JOBS), f"README job table's rows {list(table)} differ from conf.jobs.JOBS {list(JOBS)}"
    for name, job in JOBS.items():
        module, submit, what, _ = table[name]
        assert module == job.module, f"README lists {name} as {module}, conf.jobs runs {job.module}"
        assert submit == "yes", f"README marks {name} as not submittable; every registered job is"
        assert what == job.description, f"README describes {name} as {what!r}, conf.jobs as {job.description!r}"


def test_registered_job_modules_exist() -> None:
    for job in JOBS.values():
        path = ROOT / job.module.replace(".", "/")
        assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), (
            f"job {job.name!r}: module {job.module} has no file")

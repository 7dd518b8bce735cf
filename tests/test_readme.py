"""The README and docs/ stay the user's manual: the input tables are the declared inputs, every
switch visiontune reads is documented, the quick start is two commands that CI runs, and every
link between the pages leads somewhere."""

import re
from pathlib import Path

from visiontune.inputs import readme_tables

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_the_input_tables_match_the_declared_inputs():
    text = (ROOT / "docs" / "inputs.md").read_text(encoding="utf-8")
    start, end = "<!-- inputs:start -->", "<!-- inputs:end -->"
    block = text[text.index(start) + len(start):text.index(end)]
    assert block.strip() == readme_tables().strip(), (
        "docs/inputs.md input tables are stale: replace the block with `python -m visiontune.inputs`")


def test_the_settings_table_matches_the_declared_settings():
    from visiontune.settings import markdown_table

    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    start, end = "<!-- settings:start -->", "<!-- settings:end -->"
    assert text[text.index(start) + len(start):text.index(end)].strip() == markdown_table()


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_command():
    text = README.read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):]
    block = quick[quick.index("```bash") + 7:quick.index("```", quick.index("```bash") + 7)]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci


def test_the_readme_is_a_first_screen_and_the_manual_is_in_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150
    assert "<!-- inputs:start -->" not in text
    for page in PAGES:
        assert f"(docs/{page.name}" in text, f"the README does not link {page.name}"


def test_every_environment_variable_visiontune_reads_is_documented():
    source = ROOT / "src" / "visiontune"
    names = {name for path in source.rglob("*.py")
             for name in re.findall(r"\"(VISIONTUNE_[A-Z0-9_]+)\"", path.read_text(encoding="utf-8"))}
    assert "VISIONTUNE_INPLACE_HARDTANH" in names  # the pattern finds them
    text = "\n".join(p.read_text(encoding="utf-8") for p in [README, *PAGES])
    assert sorted(name for name in names if not re.search(rf"\b{name}\b", text)) == []


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_leads_to_a_file_and_heading():
    broken = []
    for page in [README, BENCHMARKS, *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"(?m)^#+ (.+)$", file.read_text(encoding="utf-8"))
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []

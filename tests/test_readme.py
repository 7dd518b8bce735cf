"""The README stays the user's manual: its input tables are the declared inputs."""

import re
from pathlib import Path

from visiontune.inputs import readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_input_tables_match_the_declared_inputs():
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- inputs:start -->", "<!-- inputs:end -->"
    block = text[text.index(start) + len(start):text.index(end)]
    assert block.strip() == readme_tables().strip(), (
        "README input tables are stale: replace the block with `python -m visiontune.inputs`")


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_command():
    text = README.read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):]
    block = quick[quick.index("```bash") + 7:quick.index("```", quick.index("```bash") + 7)]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci


def test_every_environment_variable_visiontune_reads_is_in_the_readme():
    source = README.parent / "src" / "visiontune"
    names = {name for path in source.rglob("*.py")
             for name in re.findall(r"\"(VISIONTUNE_[A-Z0-9_]+)\"", path.read_text(encoding="utf-8"))}
    assert "VISIONTUNE_INPLACE_HARDTANH" in names  # the pattern finds them
    text = README.read_text(encoding="utf-8")
    assert sorted(name for name in names if not re.search(rf"\b{name}\b", text)) == []

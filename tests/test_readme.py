"""Every `dlsweep ...` line of the README's code blocks works as written: the README cannot drift
from the CLI. A `run` line gets --dry-run (it would start a sweep; the dry run makes every check a
real run makes, the data set's included); a line that needs a finished sweep, a server, internet or
a placeholder id is checked with --help appended (Click parses every option first, so an unknown
option or command still fails); the rest runs as is."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlcore.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_lines() -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("dlsweep ")]


LINES = readme_lines()


def test_the_readme_shows_the_commands_a_user_needs():
    commands = {shlex.split(line)[1] for line in LINES}
    assert {"run", "report", "compare", "ui"} <= commands and len(LINES) >= 8


@pytest.mark.parametrize("line", LINES)
def test_readme_line_works_as_written(line, data_dir, monkeypatch):
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    monkeypatch.chdir(ROOT)
    args = shlex.split(line)[1:]
    if args[0] == "run":
        args += [] if "--dry-run" in args else ["--dry-run"]
        args = [a for a in args if a not in ("--resume",)]  # a dry run of what --resume would continue
    elif args[0] == "compare":
        pass  # reads two committed report folders
    else:  # report of a sweep not run here, the UI server, a placeholder run id
        args += ["--help"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{line}\n{result.output}"

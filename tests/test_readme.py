"""The README is a newcomer's first five minutes: short, with commands to copy that fit a line and that the
scripts accept as they are written, and links that lead somewhere."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _fenced_lines() -> list[str]:
    lines, inside = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def _commands(script: str) -> list[list[str]]:
    """The arguments of every ``python SCRIPT ...`` line in the README's code blocks."""
    found = []
    for line in _fenced_lines():
        words = shlex.split(line.split("#", 1)[0])
        if words[:2] == ["python", script]:
            found.append(words[2:])
    return found


def test_at_most_150_lines_and_no_command_over_100_characters():
    assert len(README.splitlines()) <= 150
    long = [line for line in _fenced_lines() if len(line) > 100]
    assert not long, long


def test_every_local_link_exists():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local and all((REPO / t).exists() for t in local), [t for t in local if not (REPO / t).exists()]


def test_train_commands_parse_as_written(tmp_path, monkeypatch):
    from asl.apps.train_options import parse_options

    commands = _commands("train.py")
    assert any("--config" in argv for argv in commands)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the config paths are relative to the clone
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        Path(argv[0]).mkdir(exist_ok=True)  # the dataset root, which the commands name but the test has not
        if "--prior-path" in argv:  # the file the README's previous command writes
            prior = Path(argv[argv.index("--prior-path") + 1])
            prior.parent.mkdir(parents=True, exist_ok=True)
            prior.write_text("Classes,avg_pred\na,0.5\n")
        options = parse_options(argv)
        assert options.data == argv[0], argv


@pytest.mark.parametrize("script", ["validate.py", "infer.py", "shards.py"])
def test_other_commands_parse_as_written(script):
    import importlib

    app = importlib.import_module(f"asl.apps.{script[:-3]}")
    commands = _commands(script)
    assert commands, script
    for argv in commands:
        app.build_parser().parse_args(argv)

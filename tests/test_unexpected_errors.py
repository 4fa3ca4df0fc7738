"""An exception kvbench did not expect reaches the user as one line and exit code 2, never a raw traceback; the
traceback goes to a file the line names (issue 29, item 6)."""

import re
from pathlib import Path

import kvbench.harness.cli.commands as commands


def test_an_unexpected_exception_is_one_line_with_the_traceback_on_disk(monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        raise RuntimeError("something inside\nspanning lines")

    monkeypatch.setattr(commands, "_cmd_list", broken)
    assert commands.main(["list", "methods"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("kvbench: error: unexpected RuntimeError: something inside spanning lines")
    path = Path(re.search(r"report it with (\S+)\)$", lines[0]).group(1))
    written = path.read_text()
    assert "Traceback (most recent call last)" in written and "in broken" in written
    path.unlink()

"""The command surface: ``python main.py --help`` lists every command, each with one line."""

import pytest

from srlm.cli import EXTRA_COMMANDS, main


def test_help_lists_every_command_with_a_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    table = out.split("Commands (each takes --help):", 1)[1].split("\n\n", 1)[0]
    lines = {line.split()[0]: line for line in table.strip().splitlines()}
    for name in ["fit", "validate", "loop", *EXTRA_COMMANDS]:
        assert name in lines, name
        assert len(lines[name].split(None, 1)) == 2  # a description follows the name

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


def test_quiet_drops_only_the_repeated_third_party_lines(caplog):
    import logging
    import warnings

    from srlm.quiet import quiet

    quiet()
    quiet()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Tip: try installing litlogger")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load from kernels-community")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet()
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else"]

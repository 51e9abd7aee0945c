"""The command surface: ``python main.py --help`` lists every command, each with one line."""

import pytest

from srlm.cli import COMMANDS, main

EVERY_COMMAND = ["fit", "validate", "test", "predict", "loop", "evaluate", "ifeval", "head-to-head", "report",
                 "generate-prompts", "generate-candidates", "judge", "make-pairs", "prepare-oasst", "split-ranked",
                 "build-eft", "build-eft-checked"]


def test_help_lists_every_command_with_a_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    table = out.split("Commands (each takes --help):", 1)[1]
    lines = {line.split()[0]: line for line in table.strip().splitlines()}
    assert set(COMMANDS) == set(EVERY_COMMAND) == set(lines)
    for name in EVERY_COMMAND:
        description = lines[name].split(None, 1)[1]
        assert description.endswith(".") and "\n" not in description, name


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

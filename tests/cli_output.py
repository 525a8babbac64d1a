"""What a command printed, as the tests check it."""

from __future__ import annotations


def one_error_line(capsys) -> str:
    """The one non-blank line a command wrote to stderr (fails the test if there were more or none)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]

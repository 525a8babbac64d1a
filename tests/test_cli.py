"""One definition per flag, the same meaning everywhere."""

import argparse
import json

from platebench.harness.cli import build_parser, main
from platebench.harness.commands.flags import PER_COMMAND_DEFAULT


def test_storage_flags_work_before_and_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--s3-anon", "--s3-endpoint", "http://h:9", "inspect", "--data", "d"])
    after = parser.parse_args(["inspect", "--data", "d", "--s3-anon", "--s3-endpoint", "http://h:9"])
    neither = parser.parse_args(["inspect", "--data", "d"])
    assert (before.s3_anon, before.s3_endpoint) == (after.s3_anon, after.s3_endpoint) == (True, "http://h:9")
    assert (neither.s3_anon, neither.s3_endpoint) == (False, None)


def test_json_means_the_same_in_every_command(tmp_path, capsys):
    """--json alone prints JSON on stdout; --json FILE writes it there."""
    assert main(["methods", "erm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "erm"
    path = tmp_path / "m.json"
    assert main(["methods", "erm", "--json", str(path)]) == 0
    assert json.loads(path.read_text())[0]["name"] == "erm"
    for argv in (["perf", "tune", "--json"], ["ingest", "rxrx1", "--src", "s", "--data", "o", "--json"]):
        assert build_parser().parse_args(argv).json == "-"


def test_seed_and_seeds_mean_the_same_in_every_command(capsys):
    """`--seed` is the one seed of what a command draws, `--seeds` a run's training seeds; both refuse a negative
    value with the same line (exit 2) in every command that has them."""
    import pytest

    single = (["synth"], ["sweep", "--data", "d", "--split-scheme", "s", "--method", "erm"], ["perf", "train"])
    several = (["run", "--data", "d", "--split-scheme", "s", "--method", "erm"], ["bench"])
    for argv, flag in [(a, "--seed") for a in single] + [(a, "--seeds") for a in several]:
        assert build_parser().parse_args([*argv, flag, "3"]).__dict__[flag.lstrip("-")] in (3, [3])
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*argv, flag, "-1"])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be >= 0, got -1" in capsys.readouterr().err


def _commands(parser, path=()):
    """(name, parser) of every command and `perf`/`ingest` subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from _commands(sub, (*path, name))


def test_every_flag_is_declared_alike_in_every_command():
    """A flag name has one help text, type, metavar, default (and choices, const, action) wherever it appears:
    only `required` and the number of values may differ, and the default of the amounts of work that belong to
    each command (flags.PER_COMMAND_DEFAULT, shown by their help)."""
    first: dict[str, tuple[str, dict]] = {}
    for command, parser in _commands(build_parser()):
        for action in parser._actions:
            declared = {"help": action.help, "type": action.type, "metavar": action.metavar,
                        "default": action.default, "choices": action.choices, "const": action.const,
                        "action": type(action).__name__}
            for flag in action.option_strings:
                if flag in PER_COMMAND_DEFAULT:
                    declared = {k: v for k, v in declared.items() if k != "default"}
                where, seen = first.setdefault(flag, (command, declared))
                assert declared == seen, f"{flag} differs between `{where}` and `{command}`"
    # the shared flags are shared: one meaning where five meanings were
    assert {flag for flag in first} >= {"--data", "--out", "--split-scheme", "--backbone", "--hparams", "--epochs",
                                        "--max-concurrent", "--json", "--seed", "--seeds"}


def test_data_is_a_dataset_root_and_out_a_products_folder_in_every_command():
    parser = build_parser()
    for argv in (["synth"], ["ingest", "rxrx1", "--src", "s"], ["inspect"], ["run", "--method", "erm"],
                 ["sweep", "--method", "erm"], ["bench"], ["perf", "data"],
                 ["analyze", "--records", "r", "--run", "x"]):
        assert parser.parse_args([*argv, "--data", "ds"]).data == "ds"
    for argv in (["run", "--data", "d", "--method", "erm"], ["bench"], ["leaderboard", "--records", "r"],
                 ["export", "--records", "r"], ["analyze", "--records", "r", "--run", "x"]):
        assert parser.parse_args([*argv, "--out", "o"]).out == "o"

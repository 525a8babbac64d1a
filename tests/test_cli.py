"""One definition per flag, the same meaning everywhere."""

import json

from platebench.harness.cli import build_parser, main


def test_storage_flags_work_before_and_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--s3-anon", "--s3-endpoint", "http://h:9", "inspect", "d"])
    after = parser.parse_args(["inspect", "d", "--s3-anon", "--s3-endpoint", "http://h:9"])
    neither = parser.parse_args(["inspect", "d"])
    assert (before.s3_anon, before.s3_endpoint) == (after.s3_anon, after.s3_endpoint) == (True, "http://h:9")
    assert (neither.s3_anon, neither.s3_endpoint) == (False, None)


def test_json_means_the_same_in_every_command(tmp_path, capsys):
    """--json alone prints JSON on stdout; --json FILE writes it there."""
    assert main(["methods", "erm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "erm"
    path = tmp_path / "m.json"
    assert main(["methods", "erm", "--json", str(path)]) == 0
    assert json.loads(path.read_text())[0]["name"] == "erm"
    for argv in (["perf", "tune", "--json"], ["ingest", "rxrx1", "--src", "s", "--out", "o", "--json"]):
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

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

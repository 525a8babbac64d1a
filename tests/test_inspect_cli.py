"""`platebench inspect`: exit codes and messages users (and acceptance checks) rely on."""

from pathlib import Path

import pytest
from platebench.harness.cli import main
from shard_fixtures import build_tiny_dataset


def test_verify_passes_on_a_good_dataset(tmp_path, capsys):
    root = build_tiny_dataset(tmp_path / "ds")
    assert main(["inspect", "--data", root, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: all 6 parts match their checksums" in out
    assert "new_batches       test              2       48        40         8" in out


def test_verify_fails_naming_the_damaged_plate_and_part(tmp_path, capsys):
    root = build_tiny_dataset(tmp_path / "ds")
    part = Path(root) / "plates" / "b2p1" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[-40] ^= 0x55
    part.write_bytes(bytes(data))
    assert main(["inspect", "--data", root, "--verify"]) == 2
    err = capsys.readouterr().err
    assert "DAMAGED" in err and "plates/b2p1/part-00000.parquet" in err
    assert err.rstrip().splitlines()[-1] == f"platebench inspect: error: {root}: verify found 1 of 6 parts damaged"


def test_list_split_prints_image_ids(tmp_path, capsys):
    root = build_tiny_dataset(tmp_path / "ds")
    assert main(["inspect", "--data", root, "--split-scheme", "new_batches", "--list-split", "id_test"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 24 and all(i.startswith("b1p") for i in ids)


def test_not_a_dataset_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["inspect", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: not found" in err and "Traceback" not in err


@pytest.mark.slow  # the S3 client retries before it gives up
def test_unreachable_s3_endpoint_is_one_clear_line(capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    rc = main(["--s3-endpoint", f"http://127.0.0.1:{port}", "inspect", "--data", "s3://nobucket/ds"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the S3 endpoint" in err and "s3://nobucket/ds/manifest.json" in err


def test_private_bucket_without_credentials_is_access_denied(s3_server, capsys, monkeypatch, tmp_path):
    s3_server.create_bucket("pb-private")
    root = build_tiny_dataset("s3://pb-private/ds", options=s3_server.options())
    assert root.startswith("s3://")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    rc = main(["--s3-endpoint", s3_server.endpoint, "--s3-anon", "inspect", "--data", "s3://pb-private/ds"])
    err = capsys.readouterr().err
    assert rc == 2 and "access denied" in err and "pb-private/ds/manifest.json" in err

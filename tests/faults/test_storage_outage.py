"""Storage outage at the end of a benchmark: the records are on S3 (reached through a TCP proxy that can be
taken down) and the leaderboard or the bundle is being built from them. A short outage is retried and gives
the same tables; a long one ends in one line (exit 2) within a bounded wait and leaves no leaderboard or
bundle that could be read as complete; the same command after the outage completes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from leaderboard_fixtures import write_root
from platebench.harness.cli import main
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.s3]


@pytest.fixture
def records_on_s3(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PLATEBENCH_STORAGE_RETRY_S", "6")  # the retry window (default 60 s), short for the test
    """(records URL, proxy, local copy of the same root): a finished benchmark's storage on moto."""
    import s3fs

    local = write_root(tmp_path / "local", datasets=("alpha",), seeds=(0, 1, 2))
    bucket = f"pb-outage-{int(time.time() * 1000) % 10**8}"
    s3_env.create_bucket(bucket)
    s3fs.S3FileSystem(**s3_env.options().s3fs_kwargs()).put(local, f"{bucket}/root", recursive=True)
    proxy = TcpProxy(s3_env.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield f"s3://{bucket}/root", proxy, local
    proxy.down()


def _tables(out) -> list[dict]:
    """Every number and mark of the leaderboard (its rows' `sources` name where the records were read)."""
    tables = json.loads(Path(out, "leaderboard.json").read_text())["tables"]
    for table in tables:
        for row in table["rows"]:
            row.pop("sources")
    return tables


def _files(bundle) -> dict[str, bytes]:
    """A bundle's files (bundle.json without its creation time and source URL)."""
    files = {str(p.relative_to(bundle)): p.read_bytes() for p in Path(bundle).rglob("*") if p.is_file()}
    meta = json.loads(files.pop("bundle.json"))
    del meta["created"], meta["exported_from"]
    return {**files, "bundle.json": meta}


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_leaderboard_outage_is_one_line_within_a_bounded_wait_and_writes_nothing(records_on_s3, tmp_path, capsys):
    url, proxy, local = records_on_s3
    out = tmp_path / "board"
    proxy.down()
    t0 = time.time()
    assert main(["leaderboard", "--records", url, "--baseline", "erm", "--out", str(out)]) == 2
    assert time.time() - t0 < 6 + 30  # the window, plus the S3 client's own retries of the last attempt
    line = _one_line(capsys)
    assert url.split("/")[2] in line and "cannot reach the S3 endpoint" in line, line
    assert not out.exists() or not list(out.iterdir())  # no leaderboard that could be read as the result
    proxy.up()
    assert main(["leaderboard", "--records", url, "--baseline", "erm", "--out", str(out)]) == 0
    assert main(["leaderboard", "--records", local, "--baseline", "erm", "--out", str(tmp_path / "local")]) == 0
    assert _tables(out) == _tables(tmp_path / "local")


def test_short_outage_while_the_leaderboard_reads_is_retried_to_the_same_tables(records_on_s3, tmp_path):
    url, proxy, local = records_on_s3
    proxy.down()
    threading.Timer(2.0, proxy.up).start()  # back inside the retry window (6 s)
    assert main(["leaderboard", "--records", url, "--baseline", "erm", "--out", str(tmp_path / "board")]) == 0
    assert main(["leaderboard", "--records", local, "--baseline", "erm", "--out", str(tmp_path / "local")]) == 0
    assert _tables(tmp_path / "board") == _tables(tmp_path / "local")


def test_bundle_export_outage_leaves_no_bundle_that_validates(records_on_s3, tmp_path, capsys):
    url, proxy, local = records_on_s3
    bundle = tmp_path / "bundle"
    proxy.down()
    assert main(["export", "--records", url, "--out", str(bundle)]) == 2
    line = _one_line(capsys)
    assert "cannot reach the S3 endpoint" in line, line
    assert not bundle.exists() or not list(bundle.iterdir())  # nothing that could be taken for a bundle
    proxy.up()
    assert main(["export", "--records", url, "--out", str(bundle)]) == 0
    assert main(["export", "--records", local, "--out", str(tmp_path / "local-bundle")]) == 0
    assert _files(bundle) == _files(tmp_path / "local-bundle")


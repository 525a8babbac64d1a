"""Storage outages (S3 on moto, reached through a TCP proxy that can be taken down).

While a run writes (its weights, records, resume state, done marker): a short outage is waited out and changes
nothing (records and weights bit-equal to the same run on a local disk); a long one is one line naming the file,
within a bounded wait, and leaves no object at all; the same write then completes.
While a leaderboard or bundle reads a finished benchmark's records, or writes itself to S3: a short outage is
retried and gives the same tables or files; a long one ends in one line (exit 2) within a bounded wait and leaves
no leaderboard or bundle that could be read as complete; the same command after the outage completes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cli_output import one_error_line
from leaderboard_fixtures import _row, write_root
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


def test_leaderboard_outage_is_one_line_within_a_bounded_wait_and_writes_nothing(records_on_s3, tmp_path, capsys):
    url, proxy, local = records_on_s3
    out = tmp_path / "board"
    proxy.down()
    t0 = time.time()
    assert main(["leaderboard", "--records", url, "--baseline", "erm", "--out", str(out)]) == 2
    assert time.time() - t0 < 6 + 30  # the window, plus the S3 client's own retries of the last attempt
    line = one_error_line(capsys)
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


def test_a_leaderboard_written_to_s3_waits_out_a_short_outage_and_a_long_one_isone_error_line(records_on_s3, tmp_path,
                                                                                        capsys, monkeypatch):
    from platebench.harness.results import report

    url, proxy, local = records_on_s3
    board = url.rsplit("/", 1)[0] + "/board"
    real, timers = report.put_all_atomic, []

    def outage_then_write(fs, files):  # the outage starts as the leaderboard's files are written
        if not timers:
            proxy.down()
            timers.append(threading.Timer(2.0, proxy.up))  # back inside the retry window (6 s)
            timers[0].start()
        return real(fs, files)

    monkeypatch.setattr(report, "put_all_atomic", outage_then_write)
    assert main(["leaderboard", "--records", local, "--baseline", "erm", "--out", board]) == 0
    timers[0].join()
    monkeypatch.setattr(report, "put_all_atomic", real)
    assert main(["leaderboard", "--records", local, "--baseline", "erm", "--out", str(tmp_path / "local")]) == 0
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, key="testing", secret="testing")
    assert json.loads(fs.cat_file(board[5:] + "/leaderboard.json"))["tables"] == \
        json.loads((tmp_path / "local" / "leaderboard.json").read_text())["tables"]
    capsys.readouterr()
    proxy.down()
    assert main(["leaderboard", "--records", local, "--baseline", "erm", "--out", board + "2"]) == 2
    line = one_error_line(capsys)
    assert f"writing the leaderboard to {board}2" in line and "cannot reach the S3 endpoint" in line, line


def test_bundle_export_outage_leaves_no_bundle_that_validates(records_on_s3, tmp_path, capsys):
    url, proxy, local = records_on_s3
    bundle = tmp_path / "bundle"
    proxy.down()
    assert main(["export", "--records", url, "--out", str(bundle)]) == 2
    line = one_error_line(capsys)
    assert "cannot reach the S3 endpoint" in line, line
    assert not bundle.exists() or not list(bundle.iterdir())  # nothing that could be taken for a bundle
    proxy.up()
    assert main(["export", "--records", url, "--out", str(bundle)]) == 0
    assert main(["export", "--records", local, "--out", str(tmp_path / "local-bundle")]) == 0
    assert _files(bundle) == _files(tmp_path / "local-bundle")



# -- writes: a run's checkpoints, records and done marker ------------------------------------------------------
@pytest.fixture
def bucket_behind_proxy(s3_env, monkeypatch):
    """(storage URL on moto reached through the proxy, proxy): an empty storage root a run writes into."""
    monkeypatch.setenv("PLATEBENCH_STORAGE_RETRY_S", "3")
    bucket = f"pb-wr-{int(time.time() * 1000) % 10**8}"
    s3_env.create_bucket(bucket)
    proxy = TcpProxy(s3_env.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield f"s3://{bucket}/root", proxy
    proxy.down()


def _writes(storage: str):
    """The writes a run makes, in its order: an epoch's weights, its records, the resume state, the done marker;
    each as (name, write(), read back)."""
    import torch
    from platebench.harness.results.layout import read_done, write_run_file
    from platebench.harness.results.records import read_records, write_epoch_records
    from platebench.harness.train.checkpointing import TrainingStore, TrainState

    store = TrainingStore(storage, None, "t-outage")
    weights = {"w": torch.arange(6.0).view(2, 3)}
    rows = [_row("r-outage", "erm", "alpha", 0, 1, "val", "all", "all", 0.5)]
    return [
        ("weights/epoch-00001.pt", lambda: store.save_weights(1, weights),
         lambda: store.load_weights(1)["w"].tolist()),
        ("records", lambda: write_epoch_records(storage, "r-outage", 1, rows),
         lambda: read_records(storage).to_pylist()),
        ("state.pt", lambda: store.save_state({"step": torch.tensor(7)}, TrainState(epoch=1)),
         lambda: (store.load_state()[0]["step"].item(), store.load_state()[1].epoch)),
        ("done.json", lambda: write_run_file(storage, "r-outage", "done.json", {"run_id": "r-outage"}),
         lambda: read_done(storage, "r-outage")),
    ]


@pytest.mark.parametrize("which", range(4), ids=["weights", "records", "state", "done"])
def test_a_short_outage_while_a_run_writes_is_retried_to_the_same_object(bucket_behind_proxy, which):
    storage, proxy = bucket_behind_proxy
    name, write, read = _writes(storage)[which]
    proxy.down()
    threading.Timer(1.0, proxy.up).start()  # back inside the retry window (3 s)
    write()
    assert proxy._server is not None  # the write really waited for the outage to end
    expected = {"weights/epoch-00001.pt": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "state.pt": (7, 1)}
    got = read()
    if name in expected:
        assert got == expected[name]
    elif name == "records":
        assert [r["value"] for r in got] == [0.5] and len(got) == 1
    else:
        assert got["run_id"] == "r-outage"


@pytest.mark.parametrize("which", range(4), ids=["weights", "records", "state", "done"])
def test_a_long_outage_while_a_run_writes_is_one_line_and_leaves_nothing_readable(bucket_behind_proxy, which):
    from platebench.datasets.errors import StorageError

    storage, proxy = bucket_behind_proxy
    name, write, read = _writes(storage)[which]
    proxy.down()
    t0 = time.time()
    with pytest.raises(StorageError) as err:
        write()
    assert time.time() - t0 < 3 + 30  # the window, plus the S3 client's own retries of the last attempt
    line = str(err.value)
    assert "\n" not in line and "still failing after 3 s" in line and "cannot reach the S3 endpoint" in line, line
    assert storage.split("/")[2] in line, line
    proxy.up()
    # Nothing half-written: no object at all, never a truncated one a reader could take for the real thing; and
    # once storage is back the same write completes.
    assert _objects(storage) == []
    write()
    assert _objects(storage) and read()


def _objects(storage: str) -> list[str]:
    from platebench.datasets.storage import filesystem

    fs, root = filesystem(storage, None)
    fs.invalidate_cache()
    return fs.find(root)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_run_waits_out_a_storage_outage_while_it_writes_and_its_results_do_not_change(s3_env, tiny_dataset,
                                                                                          tmp_path):
    """`fit_run` with its storage on S3 behind the proxy; the proxy is cut for 3 s as soon as epoch 1's weights are
    in the bucket, i.e. while the worker writes that epoch's records and resume state. The run waits it out and
    its records and weights equal those of the same run on a local disk; the bucket holds no stray object."""
    import boto3
    from platebench.datasets.shards import open_dataset
    from platebench.harness.results.records import read_records
    from platebench.harness.train.checkpointing import TrainingStore
    from platebench.harness.train.runner import Launch, fit_run
    from platebench.harness.train.runspec import build_specs

    bucket = f"pb-run-{int(time.time() * 1000) % 10**8}"
    s3_env.create_bucket(bucket)
    proxy = TcpProxy(s3_env.port)
    spec = build_specs(open_dataset(tiny_dataset), "new_batches", "erm", {"epochs": 2, "batch_size": 8}, [0],
                       "resnet-tiny")[0]
    direct = boto3.client("s3", endpoint_url=s3_env.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    cut = threading.Event()

    def cut_after_first_weights():
        deadline = time.time() + 300
        while time.time() < deadline:
            keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
            if any(k.endswith("weights/epoch-00001.pt") for k in keys):
                proxy.down()
                cut.set()
                time.sleep(3)
                proxy.up()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=cut_after_first_weights, daemon=True)
    watcher.start()
    url = f"s3://{bucket}/runs"
    try:
        through_proxy = replace(s3_env.options(), endpoint_url=proxy.endpoint)
        done = fit_run(spec, Launch(storage=url, options=through_proxy, max_failures=0))
    finally:
        watcher.join(30)
        proxy.down()
    assert cut.is_set(), "the outage never happened"
    local = str(tmp_path / "local")
    reference = fit_run(spec, Launch(storage=local, max_failures=0))
    opts = s3_env.options()

    def rows(storage, options=None):
        return sorted((r["epoch"], r["split"], r["domain_kind"], r["domain"], r["metric"], r["value"])
                      for r in read_records(storage, options).to_pylist())

    assert rows(url, opts) == rows(local)  # bit-equal: the outage changed nothing
    assert {r[0] for r in rows(url, opts)} == {1, 2} and not done["skipped"] and not reference["skipped"]
    for epoch in (1, 2):
        got = TrainingStore(url, opts, spec.training().training_id).load_weights(epoch)
        want = TrainingStore(local, None, spec.training().training_id).load_weights(epoch)
        assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got)
    objects = {o["Key"]: o["LastModified"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert not [k for k in objects if ".tmp" in k], sorted(objects)
    # The outage did hit a write: epoch 1's records, written just after its weights, waited it out.
    weights = next(t for k, t in objects.items() if k.endswith("weights/epoch-00001.pt"))
    records = next(t for k, t in objects.items() if "/records/" in k and k.rsplit("/", 1)[1].startswith("epoch-00001"))
    assert (records - weights).total_seconds() >= 2, (weights, records)


def test_a_bundle_written_to_s3_waits_out_a_short_outage_and_a_cut_one_is_never_taken_for_a_bundle(
        records_on_s3, tmp_path, capsys, monkeypatch):
    import s3fs
    from platebench.harness.results import bundle as bundle_module

    url, proxy, local = records_on_s3
    out = url.rsplit("/", 1)[0] + "/bundle"
    real, written, timers = bundle_module.put_atomic, [], []

    def outage_after_three_files(fs, path, data):  # a short outage with the bundle half written
        written.append(path)
        if len(written) == 4:
            proxy.down()
            timers.append(threading.Timer(2.0, proxy.up))  # back inside the retry window (6 s)
            timers[0].start()
        return real(fs, path, data)

    monkeypatch.setattr(bundle_module, "put_atomic", outage_after_three_files)
    assert main(["export", "--records", local, "--out", out]) == 0
    timers[0].join()
    assert main(["export", "--records", local, "--out", str(tmp_path / "local-bundle")]) == 0
    fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, key="testing", secret="testing")
    fs.get(out[5:], str(tmp_path / "from-s3"), recursive=True)
    assert _files(tmp_path / "from-s3") == _files(tmp_path / "local-bundle")

    # A long outage after three files: one line; what was written has no bundle.json and is refused as a bundle.
    written.clear()

    def cut_after_three_files(fs, path, data):
        written.append(path)
        if len(written) == 4:
            proxy.down()
        return real(fs, path, data)

    monkeypatch.setattr(bundle_module, "put_atomic", cut_after_three_files)
    capsys.readouterr()
    assert main(["export", "--records", local, "--out", out + "2"]) == 2
    line = one_error_line(capsys)
    assert f"writing the bundle to {out}2" in line and "cannot reach the S3 endpoint" in line, line
    proxy.up()
    fs.invalidate_cache()
    assert fs.find(out[5:] + "2") and not fs.exists(out[5:] + "2/bundle.json")  # half a bundle, without its seal
    monkeypatch.setattr(bundle_module, "put_atomic", real)
    assert main(["export", "--records", local, "--out", out + "2"]) == 2
    assert "holds no bundle.json" in one_error_line(capsys)

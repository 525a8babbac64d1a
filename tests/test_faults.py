"""Fault injection: storage outage mid-stream, MLflow server lost mid-run (worker and Tune-driver
failures are in test_runs.py and test_sweep.py)."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from platebench.datasets.errors import StorageError
from platebench.datasets.shards import open_dataset
from platebench.datasets.storage import StorageOptions
from platebench.harness.cli import main
from platebench.harness.data.stream import PlateStream, StreamConfig
from platebench.harness.results.records import read_records
from platebench.methods.base import BatchShape
from platebench.methods.distributed import free_port
from shard_fixtures import build_tiny_dataset
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def proxied_dataset(s3_server):
    """The tiny dataset on moto, 4-row parts (many reads), reached through a proxy we can take down."""
    bucket = f"pb-fault-{int(time.time() * 1000) % 10**8}"
    s3_server.create_bucket(bucket)
    url = build_tiny_dataset(f"s3://{bucket}/ds", part_rows=4, options=s3_server.options())
    proxy = TcpProxy(s3_server.port)
    options = StorageOptions(endpoint_url=proxy.endpoint, key="testing", secret="testing", region="us-east-1",
                             retries=1, connect_timeout=2)
    yield open_dataset(url, options), proxy
    proxy.down()


def _stream(ds):
    cfg = StreamConfig(scheme=None, split=None, shape=BatchShape(4), train=False, keep_ids=True, read_concurrency=1,
                       prefetch_blocks=1)
    return PlateStream(ds, cfg)


def test_storage_outage_mid_stream_is_retried_and_every_image_arrives_once(proxied_dataset):
    ds, proxy = proxied_dataset
    expected = sorted(r["image_id"] for r in ds.metadata().to_pylist() if r["label"] >= 0)
    it = _stream(ds).epoch(0)
    ids = list(next(it).image_ids)
    proxy.down()
    threading.Timer(2.5, proxy.up).start()  # back after a few seconds: inside the retry window (1+2+4 s)
    t0 = time.time()
    for batch in it:
        assert len(set(i.rsplit("_", 1)[0] for i in batch.image_ids)) == 1  # whole, plate-pure batches
        ids += batch.image_ids
    assert time.time() - t0 >= 2.0  # the reads really waited for the store
    assert sorted(ids) == expected  # nothing lost, nothing duplicated


def test_storage_outage_beyond_the_retries_fails_clearly_without_partial_batches(proxied_dataset):
    ds, proxy = proxied_dataset
    it = _stream(ds).epoch(0)
    seen = list(next(it).image_ids)
    proxy.down()
    with pytest.raises(Exception) as err:  # noqa: PT011 - Ray wraps the task's StorageError
        for batch in it:
            seen += batch.image_ids
    message = str(err.value)
    assert "gave up after 4 attempts" in message and "part-" in message and "cannot reach the S3 endpoint" in message
    assert isinstance(err.value, StorageError) or "StorageError" in message
    assert len(seen) == len(set(seen)) and len(seen) % 4 == 0  # only complete batches were delivered



def test_mlflow_server_lost_mid_run_training_continues_and_gap_is_reported(tmp_path, capsys):
    ds = build_tiny_dataset(tmp_path / "ds", images_per_plate=32)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db", "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "out"

        def kill_after_first_epoch():
            while not list(out.glob("records/*/epoch-00001.parquet")) and server.poll() is None:
                time.sleep(0.2)
            server.terminate()

        killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
        killer.start()
        rc = main(["run", "--data", ds, "--split-scheme", "new_batches", "--method", "erm", "--epochs", "3",
                   "--hparams", "batch_size=8", "--out", str(out), "--mlflow-uri", f"http://127.0.0.1:{port}"])
        killer.join(5)
    finally:
        server.terminate()
        server.wait(20)
    assert rc == 0  # training was not stopped by the tracking server
    records = read_records(str(out)).to_pylist()
    assert sorted({r["epoch"] for r in records}) == [1, 2, 3]
    done = json.loads(next(Path(out).glob("runs/*/done.json")).read_text())
    assert done["mlflow_gaps"], "the MLflow gap must be recorded beside the run"
    assert "warning: MLflow logging failed" in capsys.readouterr().out

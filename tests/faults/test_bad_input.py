"""Bad input, command by command: a malformed URL, an out-of-range flag, an unknown name or a bad field of a YAML
file ends the command with exit status 2 and ONE stderr line naming the flag, field or value, before anything is
written to --out and before Ray starts. A local Ray that does not start in time is one line saying what to do, with
its half-started processes stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from platebench.harness import ray_local
from platebench.harness.cli import main

pytestmark = pytest.mark.faults
unit = pytest.mark.unit

TRAIN = ["--hparams", "batch_size=4", "--no-mlflow"]  # the tiny dataset's plates hold 8 labelled images
RUN = ["run", "--data", "{data}", "--method", "erm", "--out", "{out}", *TRAIN]
BENCH = ["bench", "--data", "{data}", "--methods", "erm", "--baseline", "erm", "--seeds", "0", "--epochs", "1",
         "--out", "{out}", *TRAIN]
SWEEP = ["sweep", "--data", "{data}", "--method", "erm", "--trials", "1", "--out", "{out}", *TRAIN]

SUITE = "name: s\ndataset: {preset: tiny}\nsplit_scheme: new_batches\nmethods: [erm]\n"
SPACE = "method: erm\nparams:\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2, default: 1.0e-3}\n"
FILES = {  # written into the test's folder; {NAME} in an argument is its path
    "unknown_key.yaml": SUITE + "bogus: 1\n",
    "wrong_type.yaml": SUITE + "epochs: many\n",
    "out_of_range.yaml": SUITE + "workers: 0\n",
    "empty_range.yaml": SPACE.replace("low: 1.0e-4, high: 1.0e-2", "low: 1.0e-2, high: 1.0e-4"),
    "bad_distribution.yaml": SPACE.replace("loguniform", "gaussian"),
    "no_markers.md": "# a README without the suite's leaderboard markers\n",
}


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag`'s value replaced (or the flag added)."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i + 1], value, *argv[i + 2:]]
    return [*argv, flag, value]


# (command line, fragments its one error line must hold)
CASES = {
    # malformed or unsupported URLs, in every flag that takes one
    "run --data s3:/b/p": (_with(RUN, "--data", "s3:/b/p"), ["s3:/b/p: not a valid S3 URL", "s3://BUCKET/PATH"]),
    "run --data s3://": (_with(RUN, "--data", "s3://"), ["s3://: not a valid S3 URL"]),
    "run --data s3:///x": (_with(RUN, "--data", "s3:///x"), ["s3:///x: not a valid S3 URL"]),
    "run --data ftp://": (_with(RUN, "--data", "ftp://x/y"), ["ftp://x/y", "unsupported URL scheme 'ftp'"]),
    "run --data file:/": (_with(RUN, "--data", "file:/x"), ["file:/x: not a valid file URL"]),
    "run --data s3 credentials": (_with(RUN, "--data", "s3://KEY:SECRET@/x"), ["s3://...@/x: not a valid S3 URL"]),
    "run --storage s3:/b/x": (_with(RUN, "--storage", "s3:/b/x"), ["s3:/b/x: not a valid S3 URL"]),
    "run --storage ftp://": (_with(RUN, "--storage", "ftp://h/x"), ["ftp://h/x", "unsupported URL scheme 'ftp'"]),
    "bench --data s3://": (_with(BENCH, "--data", "s3://"), ["s3://: not a valid S3 URL"]),
    "bench --storage s3:/b/x": (_with(BENCH, "--storage", "s3:/b/x"), ["s3:/b/x: not a valid S3 URL"]),
    "sweep --data s3:/b/p": (_with(SWEEP, "--data", "s3:/b/p"), ["s3:/b/p: not a valid S3 URL"]),
    "sweep --storage s3://": (_with(SWEEP, "--storage", "s3://"), ["s3://: not a valid S3 URL"]),
    "synth --data s3:/b/p": (["synth", "--preset", "tiny", "--data", "s3:/b/p"], ["s3:/b/p: not a valid S3 URL"]),
    "inspect --data ftp://": (["inspect", "--data", "ftp://x/y"], ["unsupported URL scheme 'ftp'"]),
    "ingest --data s3:///x": (["ingest", "rxrx1", "--src", "{tmp}", "--data", "s3:///x", "--executor", "local"],
                              ["s3:///x: not a valid S3 URL"]),
    "leaderboard --records s3:/b/x": (["leaderboard", "--records", "s3:/b/x", "--out", "{out}"],
                                      ["s3:/b/x: not a valid S3 URL"]),
    "export --records s3:/b/x": (["export", "--records", "s3:/b/x", "--out", "{out}"], ["s3:/b/x: not a valid S3 URL"]),
    "analyze --records s3:/b/x": (["analyze", "--records", "s3:/b/x", "--run", "r", "--out", "{out}"],
                                  ["s3:/b/x: not a valid S3 URL"]),
    # flags out of range or unknown (argparse: `platebench CMD: error: argument --FLAG: ...`)
    "run --workers 0": (_with(RUN, "--workers", "0"), ["argument --workers: must be >= 1, got 0", "run --help"]),
    "run --seeds -1": (_with(RUN, "--seeds", "-1"), ["argument --seeds: must be >= 0, got -1"]),
    "run --epochs 0": (_with(RUN, "--epochs", "0"), ["argument --epochs: must be >= 1, got 0"]),
    "run --precision fp8": (_with(RUN, "--precision", "fp8"), ["argument --precision: invalid choice: 'fp8'"]),
    "bench --workers 0": (_with(BENCH, "--workers", "0"), ["argument --workers: must be >= 1, got 0", "bench --help"]),
    "bench --epochs 0": (_with(BENCH, "--epochs", "0"), ["argument --epochs: must be >= 1, got 0"]),
    "bench --precision fp8": (_with(BENCH, "--precision", "fp8"), ["argument --precision: invalid choice: 'fp8'"]),
    # a flag the command does not take: argparse reports it from the top-level parser
    "sweep --seeds": (_with(SWEEP, "--seeds", "0"), ["platebench: error: unrecognized arguments: --seeds 0"]),
    "sweep --trials 0": (_with(SWEEP, "--trials", "0"), ["argument --trials: must be >= 1, got 0"]),
    "sweep --workers 0": (_with(SWEEP, "--workers", "0"), ["argument --workers: must be >= 1, got 0"]),
    "sweep --precision fp8": (_with(SWEEP, "--precision", "fp8"), ["argument --precision: invalid choice: 'fp8'"]),
    "run --inject-fault phase": (_with(RUN, "--inject-fault", "phase=eval"),
                                 ["--inject-fault: phase must be one of train, tests, sweeps, representation",
                                  "'eval'"]),
    "bench --inject-fault step": (_with(BENCH, "--inject-fault", "step=one"),
                                  ["--inject-fault: step needs an integer, got 'one'"]),
    # names and hyperparameters the command checks itself
    "run --method": (_with(RUN, "--method", "nope"), ["unknown method 'nope'"]),
    "bench --methods": (_with(BENCH, "--methods", "nope"), ["'nope'"]),
    "sweep --method": (_with(SWEEP, "--method", "nope"), ["unknown method 'nope'"]),
    "run --hparams unknown key": (_with(RUN, "--hparams", "bogus=1"), ["unknown hyperparameter 'bogus'"]),
    "run --hparams lr=-1": (_with(RUN, "--hparams", "lr=-1"), ["hyperparameter 'lr' must be in (0, inf), got -1"]),
    "run --hparams no =": (_with(RUN, "--hparams", "lr"), ["--hparams expects KEY=VALUE, got 'lr'"]),
    "bench --hparams lr=-1": (_with(BENCH, "--hparams", "lr=-1"), ["hyperparameter 'lr' must be in (0, inf)"]),
    "bench --hparams METHOD.KEY": (_with(BENCH, "--hparams", "dsu.p=0.5"), ["--hparams dsu.p", "'dsu'"]),
    "sweep --hparams unknown key": (_with(SWEEP, "--hparams", "bogus=1"), ["unknown hyperparameter 'bogus'"]),
    # suites and search spaces
    "bench --suite": (["bench", "--suite", "nope", "--out", "{out}", "--no-mlflow"], ["unknown suite 'nope'"]),
    "bench --config unknown key": (["bench", "--config", "{unknown_key.yaml}", "--out", "{out}", "--no-mlflow"],
                                   ["unknown_key.yaml: unknown key(s) ['bogus']"]),
    "bench --config wrong type": (["bench", "--config", "{wrong_type.yaml}", "--out", "{out}", "--no-mlflow"],
                                  ["wrong_type.yaml: epochs must be an integer >= 1, got 'many'"]),
    "bench --config out of range": (["bench", "--config", "{out_of_range.yaml}", "--out", "{out}", "--no-mlflow"],
                                    ["out_of_range.yaml: workers must be an integer >= 1, got 0"]),
    "bench --readme missing": (_with(BENCH, "--readme", "{tmp}/none.md"), ["--readme", "none.md: cannot read it"]),
    "bench --readme no markers": (_with(BENCH, "--readme", "{no_markers.md}"),
                                  ["no_markers.md: no <!-- quickstart-leaderboard:start -->"]),
    "bench --config missing": (["bench", "--config", "{tmp}/none.yaml", "--out", "{out}", "--no-mlflow"],
                               ["none.yaml"]),
    "sweep --space empty range": (_with(SWEEP, "--space", "{empty_range.yaml}"),
                                  ["empty_range.yaml: params.lr: empty range"]),
    "sweep --space bad field": (_with(SWEEP, "--space", "{bad_distribution.yaml}"),
                                ["bad_distribution.yaml: params.lr.distribution must be one of", "'gaussian'"]),
}


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting (or joining) Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was refused")

    monkeypatch.setattr(ray_local, "init", refuse)


def _fill(argv: list[str], data: str, tmp: Path) -> list[str]:
    for name, text in FILES.items():
        (tmp / name).write_text(text)
    names = {f"{{{name}}}": str(tmp / name) for name in FILES}
    names.update({"{data}": data, "{out}": str(tmp / "out"), "{tmp}": str(tmp)})
    return [names.get(a, a).replace("{tmp}", str(tmp)) for a in argv]


def _main(argv: list[str]) -> int:
    """main's exit status, argparse's SystemExit included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@unit
@pytest.mark.parametrize("argv,fragments", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_with_nothing_written_and_no_ray(tiny_dataset, tmp_path, capsys, no_ray,
                                                                     argv, fragments):
    ray_was_up = _ray_is_up()  # a session Ray another module started is not this command's
    argv = _fill(argv, tiny_dataset, tmp_path)
    assert _main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith((f"platebench {argv[0]}: error: ", "platebench: error: unrecognized arguments: "))
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists()
    assert _ray_is_up() == ray_was_up


@unit
@pytest.mark.parametrize("name,problem", [
    ("unknown_key.yaml", "unknown_key.yaml: unknown key(s) ['bogus']"),
    ("out_of_range.yaml", "out_of_range.yaml: workers must be an integer >= 1, got 0"),
    ("empty_range.yaml", "empty_range.yaml: params.lr: empty range (low 0.01 must be below high 0.0001)"),
])
def test_validate_names_the_bad_field_in_one_line_then_counts(tmp_path, capsys, name, problem):
    _fill([], "", tmp_path)
    assert _main(["validate", str(tmp_path / name)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # One line per problem, then the count that exit status 2 stands for.
    assert len(lines) == 2 and problem in lines[0]
    assert lines[1] == "platebench validate: error: 1 problem(s) in 1 path(s)"


@unit
@pytest.mark.parametrize("case", ["read-only folder", "under a file"])
def test_an_out_folder_that_cannot_be_written_is_one_line_at_once_before_ray(tiny_dataset, tmp_path, capsys, no_ray,
                                                                            case):
    if case == "read-only folder":
        out, shown = tmp_path / "ro", "permission denied"
        out.mkdir()
        out.chmod(0o500)
    else:  # a permanent error too: never retried as a storage outage
        (tmp_path / "file").write_text("x")
        out, shown = tmp_path / "file" / "out", "Not a directory"
    try:
        if case == "read-only folder" and os.access(out, os.W_OK):
            pytest.skip("this user (root) may write into a 0o500 folder")
        ray_was_up = _ray_is_up()
        t0 = time.monotonic()
        assert _main(_fill(_with(RUN, "--out", str(out)), tiny_dataset, tmp_path)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("platebench run: error: "), lines
        assert str(out) in lines[0] and shown in lines[0]
        assert time.monotonic() - t0 < 20  # not the 60 s of retries an outage gets
        assert not out.is_dir() or list(out.iterdir()) == []
        assert _ray_is_up() == ray_was_up
    finally:
        if out.is_dir():
            out.chmod(0o700)


@unit
def test_a_local_permission_error_is_reported_at_once_without_the_s3_hint(tmp_path):
    """What a read-only --out gives a user that is not root (the test above skips as root)."""
    import errno

    from platebench.datasets.errors import StorageError
    from platebench.datasets.storage import with_retries

    calls = []

    def refused():
        calls.append(1)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "lock.json"))

    with pytest.raises(StorageError) as exc:
        with_retries(refused, f"writing {tmp_path}/lock.json")
    assert calls == [1]
    assert str(exc.value).startswith(f"writing {tmp_path}/lock.json: permission denied (PermissionError:")
    assert "bucket" not in str(exc.value)


@unit
@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf"])
def test_a_bad_storage_retry_window_is_one_line_naming_the_variable(tmp_path, capsys, monkeypatch, value):
    from leaderboard_fixtures import write_root

    records = write_root(tmp_path / "store", datasets=("alpha",), methods=("erm",))
    monkeypatch.setenv("PLATEBENCH_STORAGE_RETRY_S", value)
    assert _main(["leaderboard", "--records", records, "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"platebench leaderboard: error: PLATEBENCH_STORAGE_RETRY_S={value!r}: expected a number of "
                     "seconds > 0"]
    assert not (tmp_path / "out").exists()


def test_a_missing_bucket_is_one_line_saying_so(tiny_dataset, tmp_path, capsys, no_ray, s3_env):
    argv = _fill(_with(RUN, "--storage", "s3://no-such-bucket/x"), tiny_dataset, tmp_path)
    assert _main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/x" in lines[0] and "no such bucket" in lines[0], lines
    assert not (tmp_path / "out").exists()
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint, region_name="us-east-1")
    assert "no-such-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]  # never created


def _processes_naming(folder: str) -> list[str]:
    """Command lines of the living processes that name `folder` (Ray's raylet, gcs_server, dashboard, ...)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead, only not yet reaped by its parent
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if folder in cmdline and int(proc.name) != os.getpid():
            found.append(cmdline[:200])
    return found


@pytest.mark.slow
def test_a_local_ray_that_does_not_start_in_time_is_one_line_and_leaves_no_process(tiny_dataset, tmp_path):
    from ray_procs import kill_ray_under

    # Short: Ray puts unix sockets under it (107-byte limit).
    ray_tmp = tempfile.mkdtemp(prefix="pb-bi-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, ray_local.START_WAIT_ENV: "0.5"}
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "platebench"), "run", "--data", tiny_dataset, "--method", "erm",
             "--out", str(tmp_path / "out"), *TRAIN],
            env=env, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1, lines
        assert lines[0].startswith("platebench run: error: the local Ray did not start within")
        for advice in (f"{ray_local.START_WAIT_ENV}=1", "--num-cpus N", "--address HOST:PORT"):
            assert advice in lines[0]
        assert time.monotonic() - t0 < 60
        assert _processes_naming(ray_tmp) == []
        assert not list((tmp_path / "out").glob("runs/*"))
    finally:
        kill_ray_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

"""A full disk (ENOSPC on every write under the output folder, as the OS reports it): one line naming the path
(exit 2), before Ray starts when the folder is full from the start; a leaderboard or bundle that could not be
written whole leaves the previous one whole, or no bundle that could be taken for a finished one."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from cli_output import one_error_line
from fsspec.implementations.local import LocalFileSystem
from leaderboard_fixtures import write_root
from platebench.harness import ray_local
from platebench.harness.cli import main

pytestmark = [pytest.mark.faults, pytest.mark.unit]


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(folder, after=n)`: every write under `folder` fails with ENOSPC once `n` files were written."""
    real = LocalFileSystem.pipe_file

    def arm(folder: Path, after: int = 0):
        written = []

        def pipe_file(self, path, value, *args, **kwargs):
            if str(path).startswith(str(folder)):
                if len(written) >= after:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                written.append(path)
            return real(self, path, value, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "pipe_file", pipe_file)
    return arm


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started on a full disk")

    monkeypatch.setattr(ray_local, "init", refuse)


def test_run_on_a_full_disk_is_one_line_before_ray_starts(tiny_dataset, tmp_path, capsys, full_disk, no_ray):
    out = tmp_path / "out"
    full_disk(out)
    assert main(["run", "--data", tiny_dataset, "--method", "erm", "--hparams", "batch_size=4", "--no-mlflow",
                 "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "no space left on the device" in line, line
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing half-written


def test_a_leaderboard_that_cannot_be_written_whole_leaves_the_previous_one(tmp_path, capsys, full_disk):
    records = write_root(tmp_path / "store", datasets=("alpha",))
    board = tmp_path / "board"
    assert main(["leaderboard", "--records", records, "--baseline", "erm", "--out", str(board)]) == 0
    before = {p.name: p.read_bytes() for p in board.iterdir()}
    write_root(tmp_path / "store", datasets=("alpha",), methods=("m1",), perturb={"m1-alpha-s0": 0.2})
    capsys.readouterr()
    full_disk(board, after=2)  # the disk fills after two of the new leaderboard's files
    assert main(["leaderboard", "--records", records, "--baseline", "erm", "--out", str(board)]) == 2
    line = one_error_line(capsys)
    assert f"writing the leaderboard to {board}" in line and "no space left on the device" in line, line
    assert {p.name: p.read_bytes() for p in board.iterdir()} == before  # the previous leaderboard, whole


def test_a_bundle_that_cannot_be_written_whole_is_never_taken_for_one(tmp_path, capsys, full_disk):
    records = write_root(tmp_path / "store", datasets=("alpha",))
    bundle = tmp_path / "bundle"
    full_disk(bundle, after=5)
    assert main(["export", "--records", records, "--out", str(bundle)]) == 2
    line = one_error_line(capsys)
    assert f"writing the bundle to {bundle}" in line and "no space left on the device" in line, line
    assert not (bundle / "bundle.json").exists() and not list(bundle.rglob("*.tmp-*"))
    assert main(["validate", str(bundle)]) == 2  # read as a storage root: its runs lack their done markers
    assert "the run is incomplete" in capsys.readouterr().err
    assert main(["export", "--records", records, "--out", str(bundle)]) == 2
    assert "exists, is not empty and holds no bundle.json (an export that failed?)" in one_error_line(capsys)

"""`platebench synth` end to end: Ray tasks per plate, same bytes as a serial run, --overwrite, S3."""

from __future__ import annotations

import json

import pytest
from platebench.datasets.shards import open_dataset
from platebench.datasets.synth import plan, write_dataset
from platebench.harness.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The reference: tiny seed 3 generated serially in this process."""
    return write_dataset(plan("tiny", 3), str(tmp_path_factory.mktemp("serial") / "tiny"))


def test_cli_generates_the_same_dataset_as_a_serial_run(serial, tmp_path, capsys):
    out = str(tmp_path / "tiny")
    assert main(["synth", "--preset", "tiny", "--data", out, "--seed", "3"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("synth: 6 plates, 288 images (5x16x16 uint8)") and "seed 3" in summary
    m = open_dataset(out).manifest
    assert m.checksum() == serial.checksum()
    assert [p.sha256 for p in m.parts] == [p.sha256 for p in serial.parts]
    assert open_dataset(out).verify() == []
    assert m.provenance["preset"]["name"] == "tiny" and m.provenance["seed"] == 3


def test_overwrite_is_refused_unless_asked(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", "--preset", "tiny", "--data", str(out), "--size", "8"]) == 0
    before = (out / "manifest.json").read_text()
    assert main(["synth", "--preset", "tiny", "--data", str(out), "--size", "12"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before  # untouched
    assert main(["synth", "--preset", "tiny", "--data", str(out), "--size", "12", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["height"] == 12
    assert open_dataset(str(out)).verify() == []


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert main(["synth", "--preset", "nope", "--data", str(tmp_path / "a")]) == 2
    assert "unknown synth preset 'nope'" in capsys.readouterr().err
    assert main(["synth", "--preset", "tiny", "--data", str(tmp_path / "b"), "--set", "effects.glare=1"]) == 2
    assert "unknown synth override key 'effects.glare'" in capsys.readouterr().err
    assert main(["synth", "--preset", "tiny"]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_s3_output_has_the_same_checksums_as_local_disk(serial, s3_env):
    from platebench.harness.prepare.synth import generate

    s3_env.create_bucket("pb-synth")
    opts = s3_env.options()
    result = generate("tiny", "s3://pb-synth/tiny", seed=3, options=opts, progress=lambda line: None)
    remote = open_dataset("s3://pb-synth/tiny", opts)
    assert remote.manifest.checksum() == serial.checksum() == result.manifest.checksum()
    assert [p.sha256 for p in remote.manifest.parts] == [p.sha256 for p in serial.parts]
    assert remote.verify() == []

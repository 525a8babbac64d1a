"""The ingest job: resuming, the Ray Data path, and the `platebench ingest` command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from platebench.datasets.errors import DatasetError
from platebench.datasets.shards import open_dataset
from platebench.harness.cli import main
from platebench.harness.prepare.ingest import run_ingest
from raw_fixtures import build_rxrx1, build_wilds

PLATES = ["HEPG2-01_1", "HEPG2-01_2", "HEPG2-02_1", "HEPG2-03_1", "U2OS-01_1", "U2OS-02_1", "U2OS-03_1"]


@pytest.fixture(scope="module")
def rxrx1_raw(tmp_path_factory):
    return build_rxrx1(tmp_path_factory.mktemp("rxrx1") / "raw")


def _local(src, out, **cfg):
    return run_ingest("rxrx1", {"src": str(src), **cfg}, str(out), executor="local", progress=False)


def _part_files(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("plates/*/part-*")}


def test_resume_keeps_intact_plates_and_rewrites_damaged_ones(rxrx1_raw, tmp_path):
    out = tmp_path / "out"
    first = _local(rxrx1_raw["root"], out)
    assert first["plates_written"] == 7 and first["images"] == 70
    before = _part_files(out)

    again = _local(rxrx1_raw["root"], out)
    assert (again["plates_written"], again["plates_resumed"], again["images"]) == (0, 7, 0)
    assert again["images_total"] == 70 and _part_files(out) == before  # nothing rewritten

    damaged = out / "plates" / "U2OS-02_1" / "part-00000.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "plates" / "HEPG2-02_1" / "_plate.json").unlink()  # an interrupted write
    third = _local(rxrx1_raw["root"], out)
    assert (third["plates_written"], third["plates_resumed"]) == (2, 5)
    ds = open_dataset(str(out))
    assert ds.verify() == [] and ds.manifest.rows == 70
    after = _part_files(out)
    changed = {k.split("/")[1] for k in after if after[k] != before[k]}
    assert changed == {"U2OS-02_1", "HEPG2-02_1"}


def test_changed_options_rewrite_every_plate(rxrx1_raw, tmp_path):
    out = tmp_path / "out"
    _local(rxrx1_raw["root"], out)
    cropped = _local(rxrx1_raw["root"], out, crop=8)
    assert cropped["plates_written"] == 7 and open_dataset(str(out)).manifest.image_shape == (6, 8, 8)
    assert open_dataset(str(out)).verify() == []


def test_failed_run_writes_no_manifest_and_resumes_after_the_fix(rxrx1_raw, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(rxrx1_raw["root"], root)
    broken = root / "images/U2OS-01/Plate1/B02_s1_w1.png"  # plate U2OS-01_1, the 5th in plan order
    moved = tmp_path / "moved.png"
    broken.rename(moved)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="B02_s1_w1.png"):
        _local(root, out)
    assert not (out / "manifest.json").exists()
    moved.rename(broken)
    result = _local(root, out)
    assert (result["plates_resumed"], result["plates_written"]) == (4, 3)
    assert open_dataset(str(out)).manifest.rows == 70


# ---------------------------------------------------------------------------------------------
# the Ray Data path and the command line
# ---------------------------------------------------------------------------------------------
def test_cli_acceptance_commands(ray_session, rxrx1_raw, tmp_path, capsys):
    wilds = build_wilds(tmp_path / "wilds")
    assert main(["ingest", "rxrx1-wilds", "--src", str(wilds["root"]), "--data", str(tmp_path / "w")]) == 0
    ds = open_dataset(str(tmp_path / "w"))
    assert set(ds.manifest.split_schemes) == {"official", "mixed-to-test"}
    assert set(ds.metadata().column("image_id").to_pylist()) == {r["site_id"] for r in wilds["rows"]}

    assert main(["ingest", "rxrx1", "--src", str(rxrx1_raw["root"]), "--data", str(tmp_path / "r")]) == 0
    ds = open_dataset(str(tmp_path / "r"))
    assert set(ds.manifest.split_schemes) == {"official"} and sorted(ds.manifest.plates) == PLATES
    assert set(ds.metadata().column("image_id").to_pylist()) == {r["site_id"] for r in rxrx1_raw["rows"]}
    assert "wrote 70 images" in capsys.readouterr().out

    # the second run resumes every plate (checksums verified inside the Ray tasks)
    assert main(["ingest", "rxrx1", "--src", str(rxrx1_raw["root"]), "--data", str(tmp_path / "r"), "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plates_resumed"] == 7 and result["images"] == 0


def test_cli_reports_bad_data_from_a_ray_task(ray_session, rxrx1_raw, tmp_path, capsys):
    root = tmp_path / "raw"
    shutil.copytree(rxrx1_raw["root"], root)
    (root / "images/HEPG2-03/Plate1/C03_s2_w6.png").unlink()
    rc = main(["ingest", "rxrx1", "--src", str(root), "--data", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "C03_s2_w6.png: file is missing" in err and "--skip-bad" in err
    rc = main(["ingest", "rxrx1", "--src", str(root), "--data", str(tmp_path / "out"), "--no-progress",
               "--skip-bad"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [i["item"] for i in report["items"]] == ["site_id=HEPG2-03_1_C03_2"]

"""`platebench export` and what a maintainer does with its bundles: validate, merge, cost.

One real benchmark (erm and adabn sharing each seed's training, 2 seeds, 1 epoch, on a tiny shard dataset) is
trained once for the module; everything else reads its storage root.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from platebench.datasets.manifest import Manifest
from platebench.harness.cli import main
from platebench.harness.errors import HarnessError
from platebench.harness.results import sources
from platebench.harness.results.leaderboard import build_leaderboard
from shard_fixtures import build_tiny_dataset

PICKLE, ZIP = b"\x80", b"PK\x03\x04"  # pickle protocol >= 2; zip, which torch.save writes


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("export")
    ds = build_tiny_dataset(root / "ds", images_per_plate=32)
    assert main(["bench", "--data", ds, "--split-scheme", "new_batches", "--methods", "erm", "adabn", "--seeds", "0",
                 "1", "--epochs", "1", "--hparams", "batch_size=8", "--out", str(root / "out"), "--no-mlflow"]) == 0
    return root / "out", ds


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "all"
    assert main(["export", "--records", str(trained[0]), "--out", str(out)]) == 0
    return out


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def _rehash(bundle: Path) -> None:
    """What a tamperer does after editing a bundle: list the edited files' new sha256 in bundle.json."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"] = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in _files(bundle).items()
                     if n != "bundle.json"}
    (bundle / "bundle.json").write_text(json.dumps(meta))


def test_the_bundle_holds_data_only(trained, bundle):
    storage, _ = trained
    # the storage root has weights (and the exporter had to leave them behind)
    assert any(n.startswith("trainings/") for n in _files(storage))
    files = _files(bundle)
    assert not [n for n in files if n.endswith((".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy"))]
    for name, path in files.items():
        head = path.read_bytes()[:4]
        assert not head.startswith((PICKLE, ZIP)), name
        assert head == b"PAR1" if name.endswith(".parquet") else head[:1] == b"{", name
    meta = json.loads((bundle / "bundle.json").read_text())
    run_ids = sorted(p.name for p in (storage / "runs").iterdir())
    assert sorted(r["run_id"] for r in meta["runs"]) == run_ids
    expected = {"bundle.json"} | {f"runs/{r}/{n}" for r in run_ids for n in ("spec.json", "done.json")} | {
        n for n in _files(storage) if n.startswith("records/")}
    assert set(files) == expected
    assert meta["files"] == {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in files.items()
                             if n != "bundle.json"}
    for n in meta["files"]:  # records copied byte for byte
        assert (bundle / n).read_bytes() == (storage / n).read_bytes()


def test_the_bundle_describes_dataset_code_and_environment(trained, bundle):
    storage, ds = trained
    meta = json.loads((bundle / "bundle.json").read_text())
    manifest = Manifest.from_json((Path(ds) / "manifest.json").read_text())
    (d,) = meta["datasets"]
    assert (d["dataset"], d["dataset_checksum"], d["split_scheme"]) == ("tiny", manifest.checksum(), "new_batches")
    scheme = manifest.split_schemes["new_batches"]
    assert d["scheme"] == {"description": scheme.description, "splits": scheme.splits,
                           "selection_split": scheme.selection_split, "selection_rule": scheme.selection_rule}
    assert d["manifest"]["status"] == "read"
    for r in meta["runs"]:
        spec = json.loads((storage / "runs" / r["run_id"] / "spec.json").read_text())
        done = json.loads((storage / "runs" / r["run_id"] / "done.json").read_text())
        assert r["code_identity"] == spec["code"] and r["code"] == f"{spec['code']['version']}+{spec['code']['source']}"
        assert (r["device"], r["training_id"]) == (done["resources"]["device"], done["training_id"])
    env = meta["environment"]
    import ray
    import torch

    assert env["trained_with"] and all(e["torch"] == torch.__version__ and e["ray"] == ray.__version__
                                       for e in env["trained_with"])
    assert {"python", "platebench", "torch", "ray"} <= set(env["exported_with"])
    assert env["devices"] == sorted({r["device"] for r in meta["runs"]})


def test_when_the_manifest_is_gone_the_bundle_lists_the_checksum_alone(trained, tmp_path, capsys):
    storage, ds = trained
    moved = tmp_path / "store"
    shutil.copytree(storage, moved, ignore=shutil.ignore_patterns("trainings", "ray", "data"))
    for spec in moved.glob("runs/*/spec.json"):  # the runs name a dataset URL that no longer exists
        s = json.loads(spec.read_text())
        s["data"] = str(tmp_path / "gone")
        spec.write_text(json.dumps(s))
    assert main(["export", "--records", str(moved), "--out", str(tmp_path / "b")]) == 0
    assert "bundle lists the checksum only" in capsys.readouterr().err
    (d,) = json.loads((tmp_path / "b" / "bundle.json").read_text())["datasets"]
    assert d["scheme"] is None and d["manifest"]["status"] == "checksum only"
    assert d["dataset_checksum"] == Manifest.from_json((Path(ds) / "manifest.json").read_text()).checksum()
    assert main(["validate", str(tmp_path / "b")]) == 0


def test_filters_select_runs_by_method_and_dataset(trained, tmp_path, capsys):
    storage, _ = trained
    assert main(["export", "--records", str(storage), "--out", str(tmp_path / "a"), "--methods", "adabn",
                 "--dataset", "tiny"]) == 0
    meta = json.loads((tmp_path / "a" / "bundle.json").read_text())
    assert {r["method"] for r in meta["runs"]} == {"adabn"} and len(meta["runs"]) == 2
    assert meta["filters"] == {"methods": ["adabn"], "dataset": "tiny"}
    assert {p.name.split("-s")[0] for p in (tmp_path / "a" / "records").iterdir()} == {"adabn"}
    capsys.readouterr()
    assert main(["export", "--records", str(storage), "--out", str(tmp_path / "x"), "--dataset", "rxrx1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dataset: no runs of dataset 'rxrx1'" in err and "datasets there: tiny" in err
    assert main(["export", "--records", str(storage), "--out", str(tmp_path / "a")]) == 2  # not into a used folder
    assert "exists, is not empty; export into a new folder" in capsys.readouterr().err


def test_validate_accepts_the_bundle_and_names_each_problem(trained, bundle, tmp_path, capsys):
    _, ds = trained
    assert main(["validate", str(bundle), "--manifest", ds]) == 0
    assert "bundle OK (4 runs)" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "records" / "model.pt").write_bytes(ZIP + b"weights")
    victim = sorted((bad / "records").glob("erm-s1-*/epoch-00001.tests.parquet"))[0]
    run = victim.parent.name
    t = pq.read_table(victim)  # one seed loses one test domain
    t = t.filter(pc.invert(pc.and_(pc.equal(t.column("split"), "test"), pc.equal(t.column("domain_kind"), "batch"))))
    pq.write_table(t, victim)
    other = build_tiny_dataset(tmp_path / "ds2", images_per_plate=32, seed=1)  # same name, other images
    report = tmp_path / "report.json"
    assert main(["validate", str(bad), "--manifest", other, "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert "file records/model.pt (a pickle or zip/torch file): not part of a bundle" in err
    assert f"file records/{run}/epoch-00001.tests.parquet: sha256 differs from bundle.json" in err
    assert f"run {run} (tiny/new_batches erm seed 1): field 'domain': split 'test' at epoch(s) [1] lacks" in err
    assert f"run {run}: field 'dataset_checksum':" in err and "is not the checksum of" in err
    problems = json.loads(report.read_text())[str(bad)]["problems"]
    assert len(problems) == len(err.strip().splitlines()) - 1  # one line per problem, plus the summary line
    assert all(p.startswith(("file ", "run ")) for p in problems)


def test_merging_bundles_collapses_duplicates_and_refuses_conflicts(trained, bundle, tmp_path, capsys):
    storage, _ = trained
    erm_only = tmp_path / "erm"
    assert main(["export", "--records", str(storage), "--methods", "erm", "--out", str(erm_only)]) == 0
    out = tmp_path / "lb"
    assert main(["leaderboard", "--records", str(bundle), str(erm_only), "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.loads((out / "leaderboard.json").read_text())
    test = {(r["method"], r["track"]): r for t in data["tables"] if t["split"] == "test" for r in t["rows"]}
    assert test[("erm", "standard")]["n"] == 2  # each seed once, though two bundles hold it
    assert test[("erm", "standard")]["sources"] == [str(bundle), str(erm_only)]
    assert test[("adabn", "tta")]["sources"] == [str(bundle)]
    assert len(data["settings"]["collapsed_duplicates"]) == 2
    # a copy of the erm bundle whose numbers were changed under the same run ids
    forged = tmp_path / "forged"
    shutil.copytree(erm_only, forged)
    f = sorted(forged.glob("records/erm-s0-*/epoch-00001.parquet"))[0]
    t = pq.read_table(f)
    t = t.set_column(t.schema.get_field_index("value"), "value", pc.add(t.column("value"), 0.01))
    pq.write_table(t, f)
    _rehash(forged)  # else the bundle's own checksums refuse it before merging (test_a_bundle_edited_after_export...)
    with pytest.raises(HarnessError, match=f"run {f.parent.name}: {erm_only} and {forged} hold different numbers"):
        sources.load([str(erm_only), str(forged)])


def test_a_bundle_edited_after_export_is_refused_by_leaderboard(bundle, tmp_path, capsys):
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    f = sorted(edited.glob("records/erm-s0-*/epoch-00001.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.schema.get_field_index("value"), "value", pc.add(t.column("value"), 0.01)), f)
    rel = f.relative_to(edited).as_posix()
    assert main(["leaderboard", "--records", str(edited), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{edited}: file {rel}: sha256 differs from bundle.json 'files'" in err[0]
    assert not (tmp_path / "lb" / "leaderboard.json").exists()


def test_a_spec_edited_and_rehashed_no_longer_names_its_run(bundle, tmp_path, capsys):
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    spec_path = sorted(edited.glob("runs/erm-s0-*/spec.json"))[0]
    run = spec_path.parent.name
    spec = json.loads(spec_path.read_text())
    spec["seed"] = 7  # claim another seed for these numbers
    spec_path.write_text(json.dumps(spec))
    _rehash(edited)
    assert main(["validate", str(edited)]) == 2
    err = capsys.readouterr().err
    assert f"run {run}: field 'seed': spec.json hashes to run id erm-s7-" in err and f"not {run}" in err
    assert "sha256" not in err  # the rehash hid the edit from the checksums; the run id did not


def test_cost_figures_equal_a_hand_computation_from_done_json(trained):
    storage, _ = trained
    merged = sources.load([str(storage)])
    board = build_leaderboard(merged.records, sources=merged.sources, done=merged.done)
    done = {p.parent.name: json.loads(p.read_text()) for p in storage.glob("runs/*/done.json")}
    tables = {c["track"]: c for c in board["cost"]}
    assert set(tables) == {"standard", "tta"} and tables["standard"]["split"] == "test"
    for track, method in (("standard", "erm"), ("tta", "adabn")):
        (row,) = tables[track]["rows"]
        runs = [d for d in done.values() if d["method"] == method]
        assert row["method"] == method and row["n_runs"] == len(runs) == 2
        ips = [d["timings"]["train_images_rank0"] * d["resources"]["workers"] / d["timings"]["training_s"]
               for d in runs]
        core = [(d["timings"]["training_s"] + d["timings"]["evaluation_s"]) * d["resources"]["workers"]
                * d["resources"]["cpus_per_worker"] / 3600 for d in runs]
        wall = [d["timings"]["setup_s"] + d["timings"]["training_s"] + d["timings"]["evaluation_s"] for d in runs]
        assert row["images_per_s"]["mean"] == pytest.approx(sum(ips) / 2)
        assert row["core_hours"]["mean"] == pytest.approx(sum(core) / 2)
        assert row["core_hours"]["total"] == pytest.approx(sum(core))
        assert row["wall_s"]["mean"] == pytest.approx(sum(wall) / 2)
        assert row["gpu_hours"]["mean"] == 0.0  # CPU runs
        # erm and adabn of a seed share one training: counted for both, marked shared
        assert row["shared"] is True and row["shared_with"] == ["adabn" if method == "erm" else "erm"]
        assert row["training_ids"] == sorted(d["training_id"] for d in runs)
    erm_t = sorted(d["training_id"] for d in done.values() if d["method"] == "erm")
    assert erm_t == tables["tta"]["rows"][0]["training_ids"]

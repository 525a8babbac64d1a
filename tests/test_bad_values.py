"""Bad values get one clear line (exit 2) before Ray starts, and never a done marker."""

from pathlib import Path

import pytest
from platebench.harness import ray_local
from platebench.harness.cli import main
from shard_fixtures import build_tiny_dataset


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting (or joining) Ray."""
    def refuse(*a, **k):
        raise AssertionError("Ray was started before the bad value was refused")

    monkeypatch.setattr(ray_local, "init", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("bad") / "ds")


def _run(tiny, out, *extra):
    return main(["run", "--data", tiny, "--split-scheme", "new_batches", "--method", "erm", "--out", str(out),
                 "--no-mlflow", *extra])


@pytest.mark.parametrize("extra,message", [
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--seeds", "-1"], "argument --seeds: must be >= 0, got -1"),
    (["--seeds", "a"], "argument --seeds: expected an integer, got 'a'"),
    (["--max-failures", "-2"], "argument --max-failures: must be >= 0, got -2"),
])
def test_bad_flags_are_argparse_errors(tiny, tmp_path, capsys, no_ray, extra, message):
    with pytest.raises(SystemExit) as exc:
        _run(tiny, tmp_path, *extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("hparams,message", [
    (["epochs=-3"], "hyperparameter 'epochs' must be in [1, inf), got -3"),
    (["lr=-5"], "hyperparameter 'lr' must be in (0, inf), got -5.0"),
    (["batch_size=0"], "hyperparameter 'batch_size' must be in [1, inf), got 0"),
    (["optimizer=lion"], "hyperparameter 'optimizer' must be one of adam, adamw, sgd, got 'lion'"),
    (["warmup_epochs=5", "epochs=2"], "'warmup_epochs' must be below epochs (2), got 5"),
])
def test_out_of_range_hyperparameters_are_one_line_before_ray(tiny, tmp_path, capsys, no_ray, hparams, message):
    assert _run(tiny, tmp_path, "--hparams", *hparams) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(Path(tmp_path).glob("runs/*/done.json"))


@pytest.mark.parametrize("suite,message", [
    ("seeds: [a]", "seeds[0] must be an integer >= 0, got 'a'"),
    ("seeds: [-1]", "seeds[0] must be an integer >= 0, got -1"),
    ("methods: erm", "methods must be a list of names"),
    ("epochs: 0", "epochs must be an integer >= 1, got 0"),
    ("workers: 0", "workers must be an integer >= 1, got 0"),
    ("selection: oracle", "selection must be one of val, val-loss, last-epoch, got 'oracle'"),
    ("hparams: {lr: -1}", "hyperparameter 'lr' must be in (0, inf)"),
])
def test_bad_suites_are_one_line_before_ray(tmp_path, capsys, no_ray, suite, message):
    base = {"name": "name: s", "dataset": "dataset: {preset: tiny}", "split_scheme": "split_scheme: new_batches",
            "methods": "methods: [erm]"}
    key = suite.split(":")[0]
    lines = [v for k, v in base.items() if k != key] + [suite]
    path = tmp_path / "suite.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["bench", "--config", str(path), "--out", str(tmp_path / "o"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "runs").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["parts"][0].update(rows="x"), "parts[0].rows: expected a non-negative integer, got 'x'"),
    (lambda m: m["parts"][0].update(controls=10**6), "parts[0].controls: 1000000 exceeds the part's rows"),
    (lambda m: m["parts"][0].update(sha256=None), "parts[0].sha256: expected a non-empty string, got None"),
    (lambda m: m.update(parts={}), "field 'parts' must be a JSON list, got dict"),
])
def test_bad_manifest_values_are_one_line_naming_the_field(tmp_path, capsys, no_ray, edit, message):
    import json

    root = build_tiny_dataset(tmp_path / "ds")
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    edit(manifest)
    (Path(root) / "manifest.json").write_text(json.dumps(manifest))
    assert _run(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and message in err and "Traceback" not in err


@pytest.mark.slow  # the bounded wait is 15 s
def test_a_cluster_address_that_does_not_answer_is_one_line_within_a_bounded_wait(tiny, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert _run(tiny, tmp_path / "out", "--hparams", "batch_size=8", "--address", f"127.0.0.1:{port}") == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 60
    assert f"the Ray cluster at --address 127.0.0.1:{port} does not answer" in err and "Traceback" not in err
    assert not list(Path(tmp_path / "out").glob("runs/*/done.json"))

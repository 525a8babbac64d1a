"""cluster.yaml passes Ray's own cluster-config schema (what `ray up` checks first), has the node roles, holds no
secret, and serves MLflow only behind basic authentication (its recipe run here)."""

import os
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(_config()))  # raises jsonschema.ValidationError / ValueError if not


def test_cluster_has_cpu_head_gpu_and_cpu_workers_with_bounds():
    cfg = _config()
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and nodes["head"]["resources"]["GPU"] == 0
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5", "p4d", "p5"))
    assert nodes["cpu_worker"]["node_config"]["InstanceType"].startswith(("c6i", "c7i", "m6i"))
    for name in ("gpu_worker", "cpu_worker"):
        assert 0 <= nodes[name]["min_workers"] <= nodes[name]["max_workers"] <= cfg["max_workers"]
    for node in nodes.values():  # S3 by instance role, never keys in the config
        assert "IamInstanceProfile" in node["node_config"]
    assert "aws_access_key_id" not in (REPO / "cluster.yaml").read_text().lower()


def test_nodes_install_platebench_from_its_wheel_and_the_head_serves_mlflow():
    cfg = _config()
    setup = " ".join(cfg["setup_commands"])
    assert "platebench-dist/platebench-*.whl" in setup
    assert cfg["file_mounts"]["/home/ubuntu/platebench-dist"] == "./dist"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "--backend-store-uri sqlite:" in head and "--artifacts-destination s3://" in head


def _commands(cfg: dict) -> list[str]:
    return [c for key, value in cfg.items() if key.endswith("_commands") for c in value]


def test_no_secret_is_written_in_the_yaml():
    """Credentials come from the instance role and an SSM parameter at setup time, never from this file: every
    password/secret/token assignment reads its value from a file when the command runs."""
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id in cluster.yaml"
    assert "aws_secret_access_key" not in text.lower()
    assert not any(re.search(r"runtime[_-]env", c) for c in _commands(_config()))
    assignments = re.findall(r"(?i)\b(\w*(?:password|secret|token)\w*)\s*=\s*(\S*)", " ".join(_commands(_config())))
    assert assignments, "expected the MLflow password to be wired from its file"
    for name, value in assignments:
        assert value.startswith(("%s", '"$(cat', "$(cat")), f"{name} is given a literal value in cluster.yaml"
    for command in _commands(_config()):  # whatever holds the password is created unreadable to others
        if re.search(r"mlflow-password\s*$|mlflow-password\)\"?'?\s*>|> \S*(mlflow\.env|basic_auth\.ini)", command):
            assert "umask 077" in command, command


def test_mlflow_is_not_served_unauthenticated_beyond_loopback():
    servers = [c for c in _commands(_config()) if re.search(r"\bmlflow (server|ui)\b", c)]
    assert servers
    for command in servers:
        host = (re.search(r"(?:--host|-h)[ =](\S+)", command) or [None, "127.0.0.1"])[1]
        if host not in ("127.0.0.1", "localhost", "::1"):
            assert "--app-name basic-auth" in command and "MLFLOW_AUTH_CONFIG_PATH=" in command, command


@pytest.mark.slow  # starts an MLflow server
def test_the_mlflow_auth_recipe_works(tmp_path, monkeypatch):
    """The YAML's own commands, run here with paths moved under tmp_path and the server on 127.0.0.1: the head's
    server refuses anonymous requests and accepts the credentials every node sources from ~/.platebench."""
    import secrets
    import socket
    import subprocess
    import time

    from mlflow.tracking import MlflowClient

    # the head installs it (cluster.yaml); MLflow's basic-auth app refuses to start without it
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    cfg = _config()
    home = tmp_path / "home"
    (home / ".platebench").mkdir(parents=True)
    password = secrets.token_urlsafe(18)
    (home / ".platebench" / "mlflow-password").write_text(password + "\n")  # what the SSM command leaves there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def local(command: str) -> str:
        return (command.replace("/home/ubuntu", str(home)).replace("--host 0.0.0.0", "--host 127.0.0.1")
                .replace("--port 5000", f"--port {port}").replace("s3://my-platebench-bucket/mlflow",
                                                                  str(tmp_path / "artifacts")))

    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    setup = [c for c in cfg["setup_commands"] if "mlflow.env" in c and "bashrc" not in c]
    head = [c for c in cfg["head_setup_commands"] if "pip install" not in c]
    head += [c for c in cfg["head_start_ray_commands"] if "mlflow" in c]
    server = None
    try:
        for command in setup + head:
            starts_server = "mlflow server" in command
            proc = subprocess.Popen(["bash", "-c", local(command)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=starts_server)
            if starts_server:
                server = proc.pid  # the server runs on in this process group
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{command}: {err}"
        for name in (".platebench/mlflow.env", "mlflow/basic_auth.ini", "mlflow/flask-secret-key"):
            assert (home / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
        assert password not in (home / ".platebench/mlflow.env").read_text()  # it reads the file when sourced
        sourced = subprocess.run(["bash", "-c", f". {home}/.platebench/mlflow.env && env"], env=env,
                                 capture_output=True, text=True, check=True).stdout
        creds = dict(line.split("=", 1) for line in sourced.splitlines() if line.startswith("MLFLOW_TRACKING_"))
        assert creds == {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        uri = f"http://127.0.0.1:{port}"
        # MLflow 3's server starts its uvicorn workers one by one: ~30 s on a quiet 2-core box, minutes on a loaded one
        deadline = time.time() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.time() < deadline, (home / "mlflow/server.log").read_text()[-2000:]
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(Exception, match="401|[Uu]nauthori[sz]ed|credentials"):
            MlflowClient(uri).search_experiments()
        for key, value in creds.items():
            monkeypatch.setenv(key, value)
        assert MlflowClient(uri).get_experiment_by_name("Default") is not None
    finally:
        if server is not None:
            _stop_group(server)


def _stop_group(pgid: int) -> None:
    import signal
    import time

    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.time() + 30
        while time.time() < deadline:
            os.killpg(pgid, 0)  # ProcessLookupError once every process of the group is gone
            time.sleep(0.5)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass

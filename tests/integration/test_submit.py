"""`python -m cluster.submit` against a real Ray head on loopback, started and stopped by this module. Past the
checks and the runtime_env, the commands are `ray job`'s: the assertions read its output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cluster.submit import api_address, main

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Head:
    address: str  # the Jobs API (dashboard)
    token: str  # token authentication, as Ray 2.60 enables it wherever ~/.ray/auth_token exists

    @property
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _ready(url: str, token: str) -> bool:
    try:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _head_env(token: str) -> dict[str, str]:
    """The cluster's environment: no AWS settings or credentials of ours, and no way to find any, so a job sees only
    what the submission gives it; the venv's `python` first on PATH for the entrypoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _head_processes(token: str) -> list[psutil.Process]:
    """Everything our head started, job drivers and orphans included: they all inherit its RAY_AUTH_TOKEN."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone, a zombie, or not ours to read
            if process.environ().get("RAY_AUTH_TOKEN") == token:
                found.append(process)
    return found


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """`ray start --head --block` in a session of its own (never `ray stop`, which would end every Ray on the machine);
    teardown sends it SIGTERM and kills whatever it started that is still running."""
    gcs_port, dashboard_port, agent_port, client_port = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 (closed in teardown)
    ray = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
         # the defaults, 52365 and 10001, may be another Ray's on this machine
         "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(client_port),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=_head_env(token), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address, ray_address = f"http://127.0.0.1:{dashboard_port}", os.environ.get("RAY_ADDRESS")
    try:
        deadline = time.monotonic() + 90
        while not _ready(f"{address}/api/version", token):  # submissions then wait for the node's job agent
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield Head(address, token)
    finally:
        started = _head_processes(token)
        if proc.poll() is None:
            started += psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)  # `ray start` stops the processes it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _, alive = psutil.wait_procs(started, timeout=15)  # workers and job drivers follow their raylet
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)
        log.close()
        leftovers = _head_processes(token)
        shutil.rmtree(temp_dir, ignore_errors=True)  # also its ray_current_cluster: a bare ray.init() can't find it
        assert not leftovers, f"processes outlived the head: {leftovers}"
        default_address_file = Path("/tmp/ray/ray_current_cluster")
        assert not default_address_file.exists() or f":{gcs_port}" not in default_address_file.read_text()
        assert os.environ.get("RAY_ADDRESS") == ray_address


def _cli(head: Head, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with the cluster's token, `env` and no address or AWS settings of the test session."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_API_SERVER"))}
    return subprocess.run([sys.executable, "-m", "cluster.submit", "--address", head.address, *args], cwd=REPO,
                          env=base | head.auth_env | env, capture_output=True, text=True, timeout=120)


def _job_id(stdout: str) -> str:
    match = re.search(r"Job '([^']+)' submitted successfully", stdout)
    assert match, stdout
    return match.group(1)


@pytest.fixture
def manage(head: Head, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`status`, `logs`, `list`, `stop`, `delete` in this process: (exit status, stdout), the token sent as
    RAY_JOB_HEADERS; a RAY_ADDRESS of this session (a local cluster's, dead here) must lose to --address."""
    monkeypatch.setenv("RAY_JOB_HEADERS", json.dumps({"Authorization": f"Bearer {head.token}"}))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")

    def run(*args: str) -> tuple[int, str]:
        code = main(["--address", head.address, *args])
        return code, capsys.readouterr().out

    return run


def _client(head: Head):
    """Ray's own client for the head, to check what cluster.submit did; made as cluster.submit makes its clients,
    since Ray's client would take the `manage` fixture's RAY_ADDRESS over the address it is given."""
    from ray.job_submission import JobSubmissionClient

    with api_address(head.address):
        return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def test_unreachable_address_names_the_dashboard_port(capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = _free_ports(1)
    assert main(["--address", f"http://127.0.0.1:{port}", "list"]) == 2
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "8265" in err and "kubectl port-forward" in err


def test_missing_token_is_explained(head: Head, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", head.address, "list"]) == 2  # no token of this cluster here
    err = capsys.readouterr().err
    assert f"the cluster at {head.address} refused" in err and "RAY_AUTH_MODE=token" in err


def test_address_from_the_environment_as_ray_reads_it(head: Head, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Without --address: RAY_ADDRESS, and RAY_API_SERVER_ADDRESS over it; RAY_JOB_HEADERS carries the token."""
    monkeypatch.setenv("RAY_JOB_HEADERS", json.dumps({"Authorization": f"Bearer {head.token}"}))
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", head.address)
    assert main(["list"]) == 0
    assert head.address in capsys.readouterr().out  # Ray's "Job submission server address" line
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", head.address)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a GCS address: Ray would wait 40 s on it and fail
    assert main(["list"]) == 0
    assert head.address in capsys.readouterr().out  # Ray's "Job submission server address" line


def test_submit_follows_job_to_success(head: Head, manage, tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    # settings are forwarded, secrets only when passed explicitly (job info shows env var names, values redacted)
    result = _cli(head, "make_shapes", f"out={out}", "n=4", "size=64", "shard_size=2",
                  AWS_REGION="eu-west-1", AWS_SECRET_ACCESS_KEY="local-secret", AWS_SESSION_TOKEN="local-token")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = _job_id(result.stdout)
    assert f"[make_shapes] wrote {{'folder': 4, 'webdataset': 4, 'parquet': 4}} to {out}" in result.stdout
    assert job_id.startswith("make_shapes-") and f"Job '{job_id}' succeeded" in result.stdout
    assert json.loads((out / "shapes.json").read_text())["counts"]["parquet"] == 4
    assert len(list((out / "parquet").glob("*.parquet"))) == 2
    assert set(_client(head).get_job_info(job_id).runtime_env["env_vars"]) == {"AWS_REGION"}

    code, status = manage("status", job_id)
    assert code == 0 and f"Job '{job_id}' succeeded" in status
    code, logs = manage("logs", job_id)
    assert code == 0 and "[make_shapes] wrote" in logs
    code, listing = manage("list")
    assert code == 0 and f"'{job_id}'" in listing and "python -m pipelines.make_shapes" in listing


def test_invalid_override_fails_before_submitting(head: Head, tmp_path: Path) -> None:
    before = len(_client(head).list_jobs())
    result = _cli(head, "make_shapes", f"out={tmp_path}", "nn=4")
    assert result.returncode == 2
    assert "Key 'nn' not in 'MakeShapesConf'" in result.stderr and "nothing was submitted" in result.stderr
    assert len(_client(head).list_jobs()) == before


def test_failing_job_exits_nonzero(head: Head, tmp_path: Path) -> None:
    result = _cli(head, "make_shapes", f"out={tmp_path}", "n=2", "size=8")  # schema-valid, rejected by the job
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: size must be >= 32, got 8" in result.stdout  # the job's one-line error, from the cluster
    assert f"Job '{_job_id(result.stdout)}' failed" in result.stdout + result.stderr  # Ray logs it as an error


def test_ctrl_c_leaves_the_job_running_and_stop_ends_it(head: Head, manage, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    result = _cli(head, "--no-wait", "--submission-id", "stop-me", "make_shapes", f"out={tmp_path}", "n=10000000",
                  "size=64", "formats=[folder]")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _job_id(result.stdout) == "stop-me"
    deadline = time.monotonic() + 60
    while not (folder.is_dir() and any(folder.iterdir())):
        assert time.monotonic() < deadline, "the job wrote nothing"
        time.sleep(0.2)

    follow = subprocess.Popen([sys.executable, "-m", "cluster.submit", "--address", head.address, "logs", "stop-me",
                               "--follow"], cwd=REPO, env=os.environ | head.auth_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert select.select([follow.stdout], [], [], 60)[0], "no log line"  # following, inside the event loop
    follow.send_signal(signal.SIGINT)
    _, err = follow.communicate(timeout=30)
    assert follow.returncode == 130 and "job stop-me keeps running" in err
    assert f"cluster.submit --address {head.address} stop stop-me" in err
    code, status = manage("status", "stop-me")
    assert code == 0 and "Status for job 'stop-me': RUNNING" in status

    code, stopped = manage("stop", "stop-me")
    assert code == 0 and "Attempting to stop job 'stop-me'" in stopped
    assert _client(head).get_job_status("stop-me") == "STOPPED"
    written = len(list(folder.iterdir()))
    time.sleep(1.0)
    assert len(list(folder.iterdir())) == written  # the driver is gone, not only the record

    code, deleted = manage("delete", "stop-me")
    assert code == 0 and "Job 'stop-me' deleted successfully" in deleted
    assert "stop-me" not in {job.submission_id for job in _client(head).list_jobs()}


def test_env_reaches_the_job(head: Head, s3, tmp_path: Path) -> None:
    """The head has no AWS settings nor credentials (a job without them fails): the endpoint and region are forwarded
    from here, the credentials come from --env."""
    import s3fs

    result = _cli(head, "--env", "AWS_ACCESS_KEY_ID=from-env", "--env", "AWS_SECRET_ACCESS_KEY=from-env",
                  "make_shapes", f"out={s3.uri('env-test')}", "n=2", "size=64", "formats=[parquet]",
                  AWS_ENDPOINT_URL=s3.endpoint_url, AWS_DEFAULT_REGION="us-east-1", AWS_SECRET_ACCESS_KEY="testing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert s3fs.S3FileSystem(endpoint_url=s3.endpoint_url).exists(f"{s3.bucket}/env-test/shapes.json")
    env_vars = _client(head).get_job_info(_job_id(result.stdout)).runtime_env["env_vars"]
    assert set(env_vars) == {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

"""What `cluster.submit` hands to `ray job`, checked without a cluster: `ray_job` is replaced by a recorder."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from cluster import submit
from cluster.submit import api_address, entrypoint, main, runtime_env
from conf.jobs import JOBS


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], str | None]]:
    """Each `ray job` call as (arguments, --address); the call exits 0."""
    calls: list[tuple[list[str], str | None]] = []
    monkeypatch.setattr(submit, "ray_job", lambda args, address: calls.append((list(args), address)) or 0)
    return calls


def test_entrypoint_and_runtime_env_forward_settings_not_secrets(tmp_path: Path) -> None:
    command = shlex.join(entrypoint(JOBS["make_shapes"], ["out=/data/my shapes", "formats=[folder,parquet]"]))
    assert command == "python -m pipelines.make_shapes 'out=/data/my shapes' 'formats=[folder,parquet]'"
    local = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "id",
             "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token", "HF_TOKEN": "hf"}
    spec = runtime_env(tmp_path, {"AWS_REGION": "us-east-2", "X": "a=b"}, ["einops"], local)
    assert spec == {"working_dir": str(tmp_path), "pip": ["einops"],
                    "env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "us-east-2", "X": "a=b"}}


def test_submit_sends_the_checked_job_under_a_named_id(sent, tmp_path: Path) -> None:
    assert main(["--address", "http://head:8265", "--working-dir", str(tmp_path), "--no-wait",
                 "--entrypoint-num-gpus", "1", "make_shapes", "out=/data/x", "n=4"]) == 0
    (args, address), = sent
    assert address == "http://head:8265"
    options, entry = args[:args.index("--")], args[args.index("--") + 1:]
    assert entry == ["python", "-m", "pipelines.make_shapes", "out=/data/x", "n=4"]
    assert options[0] == "submit" and "--no-wait" in options
    assert options[options.index("--entrypoint-num-gpus") + 1] == "1.0"
    assert re.fullmatch(r"make_shapes-[0-9a-f]{8}", options[options.index("--submission-id") + 1])
    assert json.loads(options[options.index("--runtime-env-json") + 1])["working_dir"] == str(tmp_path)

    assert main(["--submission-id", "mine", "--no-validate", "make_shapes", "out=/data/x"]) == 0
    args, address = sent[1]
    assert address is None and args[args.index("--submission-id") + 1] == "mine"  # Ray reads the environment


def test_commands_go_to_ray_job_as_they_are(sent) -> None:
    assert main(["logs", "job-1", "--follow"]) == 0 and main(["delete", "job-1"]) == 0
    assert [args for args, _ in sent] == [["logs", "job-1", "--follow"], ["delete", "job-1"]]


def test_invalid_overrides_or_job_send_nothing(sent, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make_shapes", "nn=4"]) == 2
    assert "Key 'nn' not in 'MakeShapesConf'" in capsys.readouterr().err
    assert main(["make_shape"]) == 2
    assert "unknown job 'make_shape'" in capsys.readouterr().err
    assert sent == []


def test_ctrl_c_says_how_to_stop_the_job(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args, address):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "ray_job", interrupted)
    assert main(["--address", "http://head:8265", "--submission-id", "s1", "--no-validate", "make_shapes"]) == 130
    assert "job s1 keeps running (`python -m cluster.submit --address http://head:8265 stop s1` ends it)" in \
        capsys.readouterr().err


def test_api_address_wins_for_the_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's client takes RAY_API_SERVER_ADDRESS over the address it is given: the given one goes there."""
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://other:8265")
    with api_address("http://head:8265"):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://head:8265"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://other:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    with api_address("http://head:8265"):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://head:8265"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    with api_address(None):
        assert "RAY_API_SERVER_ADDRESS" not in os.environ
    assert "RAY_API_SERVER_ADDRESS" not in os.environ

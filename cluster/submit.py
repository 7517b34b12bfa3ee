"""`python -m cluster.submit [options] <job> [hydra overrides...]`: run a project job on a Ray cluster.

A thin layer over Ray's Jobs API (`JobSubmissionClient`, served by the head's dashboard, port 8265): checks the
overrides against the job's Hydra schema locally, uploads the working directory, submits `python -m <module>
<overrides>`, follows the logs and exits 0 only when the job SUCCEEDED. `status`, `logs`, `stop` and `list` act on
jobs already submitted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conf.jobs import JOBS, Job

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 8265


COMMANDS = ("status", "logs", "stop", "list")

# Settings, not secrets, that a job should see as the submitter does. Credentials are never forwarded: jobs get
# them from the cluster's identity (IRSA, instance profile, a Kubernetes secret in the pod spec).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
# JobSubmissionClient lets these override even an explicit address (ray/dashboard/utils.py); ours must win.
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class SubmitError(Exception):
    """A problem the user can fix; printed without a traceback."""


def entrypoint(job: Job, overrides: Sequence[str]) -> str:
    """The shell command the cluster runs: the job's module with the overrides quoted one by one."""
    return shlex.join(["python", "-m", job.module, *overrides])


def register_schema(job: Job) -> None:
    """Fill Hydra's ConfigStore with the job's config, as the job's module does when it starts."""
    module, _, function = job.register.partition(":")
    registered = importlib.import_module(module)
    if function:
        getattr(registered, function)()


def check_overrides(job: Job, overrides: Sequence[str]) -> None:
    """Compose the job's config from this checkout's schema, so a typo fails here instead of on the cluster."""
    from hydra import compose, initialize
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_schema(job)
    try:
        with initialize(version_base=None):
            cfg = compose(config_name=job.config, overrides=list(overrides))
        OmegaConf.to_object(cfg)  # what the job's main does first: missing mandatory values fail here
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: a schema's own checks
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise SubmitError(f"invalid overrides for {job.module}: {e}{cause}\nnothing was submitted "
                          "(--no-validate skips this check)") from None


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings as a dict; the value may contain `=`."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def runtime_env(working_dir: Path, env: Mapping[str, str], pip: Sequence[str],
                local_env: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime_env: the working directory, FORWARDED_ENV from `local_env` (--env wins) and pip packages."""
    env_vars = {name: local_env[name] for name in FORWARDED_ENV if local_env.get(name)} | dict(env)
    # Ray zips `working_dir` skipping what .gitignore and .rayignore files in it exclude (each directory's own, not
    # .git/info/exclude) plus .git, .venv and __pycache__: ray/_private/runtime_env/packaging.py, working_dir.py.
    spec: dict[str, Any] = {"working_dir": str(working_dir)}
    if env_vars:
        spec["env_vars"] = env_vars
    if pip:
        spec["pip"] = list(pip)
    return spec


def resolve_address(address: str | None, local_env: Mapping[str, str]) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (Ray's own order)."""
    for candidate in (address, *(local_env.get(name) for name in ADDRESS_ENV)):
        if candidate:
            return candidate
    raise SubmitError(f"no cluster address: pass --address http://<head>:{DASHBOARD_PORT} or set RAY_ADDRESS")


@contextlib.contextmanager
def _unset(names: Sequence[str]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _headers(local_env: Mapping[str, str]) -> dict[str, str] | None:
    """Extra HTTP headers from RAY_JOB_HEADERS (JSON), as `ray job` reads them: e.g. for a proxy in front of the API."""
    if not local_env.get("RAY_JOB_HEADERS"):
        return None
    try:
        headers = json.loads(local_env["RAY_JOB_HEADERS"])
    except json.JSONDecodeError as e:
        raise SubmitError(f"RAY_JOB_HEADERS must be a JSON object of header names to values: {e}") from None
    if not isinstance(headers, dict):
        raise SubmitError("RAY_JOB_HEADERS must be a JSON object of header names to values")
    return headers


def _quiet_client_logs() -> None:
    """Ray's client logs every ignore file it reads, every request, and warns that .git and .venv stay out of the
    package (as they should); its warnings about the package's size still show."""
    for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def connect(address: str) -> JobSubmissionClient:
    """A client for the Jobs API at `address`, or a SubmitError that says where the API lives."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if "://" not in address and address != "auto":
        print(f"note: {address} is not an http:// URL: Ray reads it as the GCS address and asks it for the "
              "dashboard's; this waits a while if it is unreachable", file=sys.stderr)
    _quiet_client_logs()
    headers = _headers(os.environ)
    try:
        with _unset(ADDRESS_ENV):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        # Ray's client sends a token only when RAY_AUTH_MODE=token is set on this side too
        raise SubmitError(f"the cluster at {address} refused the request: {e.message}\n"
                          "Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) "
                          "to the cluster's token.") from None
    except Exception as e:  # requests, gRPC and Ray Client all fail differently
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address}: {e}\n"
            f"The Jobs API is the head's dashboard, http://<head>:{DASHBOARD_PORT} (not the GCS port 6379 nor a "
            f"ray:// client address). On Kubernetes: kubectl port-forward svc/<cluster>-head-svc "
            f"{DASHBOARD_PORT}:{DASHBOARD_PORT}, then --address http://127.0.0.1:{DASHBOARD_PORT}") from None


def _self_command(address: str, *args: str) -> str:
    return shlex.join(["python", "-m", "cluster.submit", "--address", address, *args])


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def wait_until_done(client: JobSubmissionClient, job_id: str, timeout_s: float = 60.0) -> JobStatus:
    """The job's terminal status; the log stream can close a moment before the status is final."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    return status


def follow(client: JobSubmissionClient, job_id: str, address: str) -> int:
    """Print the job's logs until it ends, then its status; 0 only if it SUCCEEDED. Ctrl-C leaves the job running."""
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_print_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running.\n"
              f"  follow: {_self_command(address, 'logs', job_id, '--follow')}\n"
              f"  stop:   {_self_command(address, 'stop', job_id)}", file=sys.stderr)
        return 130
    status = wait_until_done(client, job_id)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status.value}" + (f" ({info.message})" if info.message else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1


def submit(args: argparse.Namespace) -> int:
    """Check, submit and (unless --no-wait) follow one job from JOBS."""
    if args.command not in JOBS:
        raise SubmitError(f"unknown job {args.command!r}: choose one of {', '.join(JOBS)} "
                          f"(or a command: {', '.join(COMMANDS)})")
    job, overrides = JOBS[args.command], args.rest
    address = resolve_address(args.address, os.environ)
    if not args.no_validate:
        check_overrides(job, overrides)
    working_dir = Path(args.working_dir or REPO_ROOT).resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {working_dir} is not a directory")
    spec = runtime_env(working_dir, parse_env(args.env), args.pip, os.environ)
    client = connect(address)
    command = entrypoint(job, overrides)
    job_id = client.submit_job(entrypoint=command, runtime_env=spec, submission_id=args.submission_id,
                               entrypoint_num_cpus=args.entrypoint_num_cpus,
                               entrypoint_num_gpus=args.entrypoint_num_gpus)
    print(f"submitted job {job_id}: {command}\n"
          f"  follow: {_self_command(address, 'logs', job_id, '--follow')}\n"
          f"  stop:   {_self_command(address, 'stop', job_id)}", flush=True)
    return 0 if args.no_wait else follow(client, job_id, address)


def manage(args: argparse.Namespace) -> int:
    """`status <id>`, `logs <id> [--follow]`, `stop <id>`, `list`."""
    parser = argparse.ArgumentParser(prog=f"python -m cluster.submit {args.command}")
    if args.command != "list":
        parser.add_argument("job_id")
    if args.command == "logs":
        parser.add_argument("--follow", action="store_true", help="print new lines until the job ends")
    sub = parser.parse_args(args.rest)
    address = resolve_address(args.address, os.environ)
    client = connect(address)
    if args.command == "list":
        for details in sorted(client.list_jobs(), key=lambda d: d.start_time or 0):
            print(f"{details.submission_id or details.job_id}\t{details.status.value}\t{details.entrypoint}")
    elif args.command == "status":
        info = client.get_job_info(sub.job_id)
        print(f"job {sub.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.command == "logs" and sub.follow:
        return follow(client, sub.job_id, address)
    elif args.command == "logs":
        print(client.get_job_logs(sub.job_id), end="")
    else:
        requested = client.stop_job(sub.job_id)
        status = wait_until_done(client, sub.job_id)
        print(f"job {sub.job_id}: {status.value}" + ("" if requested else " (it was not running)"))
        return 0 if status.is_terminal() else 1
    return 0


EPILOG = (
    f"The job's environment: --env values and, when set here, {', '.join(FORWARDED_ENV)}. Secrets "
    "(AWS_SECRET_ACCESS_KEY, session tokens, HF tokens) are never forwarded: the cluster's identity provides "
    "credentials. --env values are stored with the job on the cluster. "
    "A cluster with token authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) here; "
    "RAY_JOB_HEADERS (JSON) adds HTTP headers, as for `ray job`. "
    "Exit status: 0 if the job SUCCEEDED, 1 if it failed or was stopped, 2 for usage, config or connection errors."
)


def build_parser() -> argparse.ArgumentParser:
    jobs = "\n".join(f"  {job.line}" for job in JOBS.values())
    parser = argparse.ArgumentParser(
        prog="python -m cluster.submit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit a project job to a Ray cluster through the Jobs API, or manage submitted jobs. Options go "
                    f"before the job.\n\njobs (conf/jobs.py):\n{jobs}\n\n"
                    "commands: status <id>, logs <id> [--follow], stop <id>, list",
        epilog=textwrap.fill(EPILOG, 100))
    parser.add_argument("--address", help=f"the Jobs API, http://<head>:{DASHBOARD_PORT}; default: "
                                          "RAY_API_SERVER_ADDRESS, then RAY_ADDRESS")
    parser.add_argument("--working-dir", help="uploaded as the job's working directory (default: the repo root); "
                                              ".gitignore and .rayignore are honoured")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="a requirement installed for the job (runtime_env pip); repeatable")
    parser.add_argument("--submission-id", help="the job's id (default: Ray picks one)")
    parser.add_argument("--no-wait", action="store_true", help="exit after submitting")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip composing the config locally before submitting")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the job's driver")
    parser.add_argument("command", metavar="<job or command>", help=f"one of {', '.join([*JOBS, *COMMANDS])}")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="Hydra overrides, or the command's arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return manage(args) if args.command in COMMANDS else submit(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the Jobs API's answers, e.g. an unknown job id
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

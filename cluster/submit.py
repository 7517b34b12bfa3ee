"""`python -m cluster.submit [options] <job> [hydra overrides...]`: run a project job on a Ray cluster.

Ours: the jobs (`conf.jobs`), checking the overrides against the job's Hydra schema before anything is sent, and the
job's runtime_env (the working directory, and settings but never credentials from this environment). The rest is
Ray's `ray job` command, run in this process: it uploads the working directory, submits `python -m <module>
<overrides>`, follows the logs, reads RAY_API_SERVER_ADDRESS, RAY_ADDRESS and RAY_JOB_HEADERS, and answers
`status`, `logs`, `stop`, `delete` and `list`, which take `ray job`'s arguments. `--address` wins over both
variables (`api_address`), which Ray's client would otherwise prefer to any address it is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import secrets
import shlex
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from conf.jobs import JOBS, Job

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 8265
COMMANDS = ("status", "logs", "stop", "delete", "list")  # `ray job <command>`, arguments passed on as they are

# Settings, not secrets, that a job should see as the submitter does. Credentials are never forwarded: jobs get
# them from the cluster's identity (IRSA, instance profile, a Kubernetes secret in the pod spec).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


class SubmitError(Exception):
    """A problem the user can fix; printed without a traceback."""


def entrypoint(job: Job, overrides: Sequence[str]) -> list[str]:
    """The command the cluster runs: the job's module with the overrides (Ray quotes them one by one)."""
    return ["python", "-m", job.module, *overrides]


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


def submit_args(args: argparse.Namespace, job: Job, submission_id: str) -> list[str]:
    """`ray job submit` arguments for the checked job, its runtime_env and the options given here."""
    working_dir = Path(args.working_dir or REPO_ROOT).resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {working_dir} is not a directory")
    spec = runtime_env(working_dir, parse_env(args.env), args.pip, os.environ)
    options = ["--submission-id", submission_id, "--runtime-env-json", json.dumps(spec)]
    for flag, value in (("--entrypoint-num-cpus", args.entrypoint_num_cpus),
                        ("--entrypoint-num-gpus", args.entrypoint_num_gpus)):
        if value is not None:
            options += [flag, str(value)]
    if args.no_wait:
        options.append("--no-wait")
    return ["submit", *options, "--", *entrypoint(job, args.rest)]


@contextlib.contextmanager
def api_address(address: str | None) -> Iterator[None]:
    """Make `address` the one Ray's job client uses for the duration. JobSubmissionClient takes
    RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, over the address it is given (ray/dashboard/utils.py,
    `get_address_for_submission_client`), so a client made without this goes wherever the environment says: a
    RAY_ADDRESS of a local cluster (a GCS address, which the client waits on for 40 s and then fails with 'Timed out
    while waiting for GCS'). Every client this project makes for an address it was given is made inside this."""
    name = "RAY_API_SERVER_ADDRESS"
    saved = os.environ.get(name)
    if address:
        os.environ[name] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _address_in_effect(address: str | None) -> str:
    """The address Ray's client used, for messages."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "a local Ray"


def _quiet_client_logs() -> None:
    """Ray's client logs every ignore file it reads, every request, and warns that .git and .venv stay out of the
    package (as they should); its warnings about the package's size still show."""
    for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def ray_job(args: Sequence[str], address: str | None) -> int:
    """`ray job <args>` in this process, returning its exit status (`submit` exits 1 when the job FAILED); failing
    to reach the cluster is a SubmitError that says where the Jobs API lives."""
    import click
    from ray.dashboard.modules.job.cli import job_cli_group
    from ray.exceptions import AuthenticationError, RpcError

    _quiet_client_logs()
    try:
        with api_address(address):
            # Ray seam: `ray job`'s click group, called as the `ray` script calls it but with errors raised to us
            code = job_cli_group.main(list(args), prog_name="ray job", standalone_mode=False)
    except SystemExit as e:
        code = e.code
    except click.Abort:  # click's form of Ctrl-C
        raise KeyboardInterrupt from None
    except click.ClickException as e:  # usage errors, with the command's usage line
        e.show()
        return 2
    except AuthenticationError as e:
        # Ray's client sends a token only when RAY_AUTH_MODE=token is set on this side too
        raise SubmitError(f"the cluster at {_address_in_effect(address)} refused the request: {e.message}\n"
                          "Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) "
                          "to the cluster's token.") from None
    except (ConnectionError, RpcError) as e:  # RpcError: an address without http:// is taken for a GCS address
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {_address_in_effect(address)}: {e}\n"
            f"The Jobs API is the head's dashboard, http://<head>:{DASHBOARD_PORT} (not the GCS port 6379 nor a "
            f"ray:// client address). On Kubernetes: kubectl port-forward svc/<cluster>-head-svc "
            f"{DASHBOARD_PORT}:{DASHBOARD_PORT}, then --address http://127.0.0.1:{DASHBOARD_PORT}") from None
    return code if isinstance(code, int) else 0


def run(args: argparse.Namespace) -> int:
    """A command goes to `ray job` as it is; a job is checked, then submitted and (unless --no-wait) followed."""
    if args.command in COMMANDS:
        ray_args = [args.command, *args.rest]
        job_id = next((arg for arg in args.rest if not arg.startswith("-")), "<id>")
    elif args.command in JOBS:
        job = JOBS[args.command]
        if not args.no_validate:
            check_overrides(job, args.rest)
        job_id = args.submission_id or f"{job.name}-{secrets.token_hex(4)}"
        ray_args = submit_args(args, job, job_id)
    else:
        raise SubmitError(f"unknown job {args.command!r}: choose one of {', '.join(JOBS)} "
                          f"(or a command: {', '.join(COMMANDS)})")
    try:
        return ray_job(ray_args, args.address)
    except KeyboardInterrupt:
        address = ["--address", args.address] if args.address else []
        stop = shlex.join(["python", "-m", "cluster.submit", *address, "stop", job_id])
        print(f"stopped following; job {job_id} keeps running (`{stop}` ends it)", file=sys.stderr)
        return 130


EPILOG = (
    f"The job's environment: --env values and, when set here, {', '.join(FORWARDED_ENV)}. Secrets "
    "(AWS_SECRET_ACCESS_KEY, session tokens, HF tokens) are never forwarded: the cluster's identity provides "
    "credentials. --env values are stored with the job on the cluster. Without --address, the cluster is "
    "RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, as for `ray job`; RAY_JOB_HEADERS (JSON) adds HTTP headers. A cluster "
    "with token authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) here. "
    "Exit status, as `ray job submit`'s: 1 if the job FAILED, 0 otherwise; 2 for usage, config or connection errors, "
    "130 when Ctrl-C stops following (the job keeps running)."
)


def build_parser() -> argparse.ArgumentParser:
    jobs = "\n".join(f"  {job.line}" for job in JOBS.values())
    parser = argparse.ArgumentParser(
        prog="python -m cluster.submit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit a project job to a Ray cluster through Ray's Jobs API, or manage submitted jobs with "
                    f"`ray job`'s commands. Options go before the job or command.\n\njobs (conf/jobs.py):\n{jobs}\n\n"
                    "commands (`ray job <command>`, --help on each): status <id>, logs <id> [--follow], stop <id>, "
                    "delete <id>, list",
        epilog=textwrap.fill(EPILOG, 100))
    parser.add_argument("--address", help=f"the Jobs API, http://<head>:{DASHBOARD_PORT}; it wins over "
                                          "RAY_API_SERVER_ADDRESS and RAY_ADDRESS")
    parser.add_argument("--working-dir", help="uploaded as the job's working directory (default: the repo root); "
                                              ".gitignore and .rayignore are honoured")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="a requirement installed for the job (runtime_env pip); repeatable")
    parser.add_argument("--submission-id", help="the job's id (default: <job>-<8 hex digits>)")
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
        return run(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the Jobs API's answers, e.g. an unknown job id
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

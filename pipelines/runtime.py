"""What every job shares at its edges: the command line (a Hydra schema composed with the overrides, a user error as
one line and exit status 2), logging for people, and the connection to Ray (the cluster in RAY_ADDRESS, or a local
one started with enough logical CPUs, its workers quietened by `quiet_worker`).

Here, below `workloads`, because the preprocessing jobs need it too; `workloads.runtime` re-exports it."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LOGGER_PREFIX = "sd3."
TRACEBACK_FLAG = "--traceback"


class JobStopped(RuntimeError):
    """A job stopped itself for a reason its message gives, with what to change (e.g. the same failure twice)."""


# Errors a user fixes by changing the command: bad overrides, values a config rejects, missing inputs.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 FileExistsError, PermissionError, JobStopped)


def logger(name: str) -> logging.Logger:
    """The project logger of one job or component (`logger("train")` prints as `[train] ...` on stdout)."""
    setup_logging()
    return logging.getLogger(LOGGER_PREFIX + name)


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever `sys.stdout` is now (Ray's and pytest's captures replace it)."""

    _sd3 = True

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix(LOGGER_PREFIX)
        text = f"[{name}] {record.getMessage()}"
        if record.levelno >= logging.WARNING:
            text = f"[{name}] {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: int = logging.INFO) -> None:
    """Project loggers print `[job] message` lines to stdout; idempotent (drivers and Ray workers both call it)."""
    root = logging.getLogger(LOGGER_PREFIX.rstrip("."))
    if any(getattr(h, "_sd3", False) for h in root.handlers):
        return
    handler = _Stdout()
    handler.setFormatter(_Format())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def one_line(error: BaseException) -> str:
    """An exception (and the config error behind it) as one line, without OmegaConf's key/type trailer lines."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 3:
        for line in str(seen).splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type=", "reference_type=", "msg:")) \
                    and line not in parts:
                parts.append(line)
        seen = seen.__cause__
    return "; ".join(parts) or type(error).__name__


def compose(config_name: str, overrides: Sequence[str]) -> Any:
    """The typed config of a job from its registered Hydra schema and command-line overrides. The dataclasses'
    own checks (`__post_init__`) run here, so a bad value fails before any work."""
    from hydra import compose as hydra_compose
    from hydra import initialize
    from omegaconf import OmegaConf

    with initialize(version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def is_user_error(error: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (*USER_ERRORS, HydraException, OmegaConfBaseException))


def cli(config_name: str, run: Callable[[Any], object], argv: Sequence[str] | None = None,
        doc: str | None = None) -> None:
    """A job's `python -m` entry: compose the config from `argv` (Hydra override syntax), then `run(cfg)`.

    A user error (bad override or value, missing input) prints `error: ...` on one line and exits with status 2;
    `--traceback` (or HYDRA_FULL_ERROR=1) shows the traceback instead. `--help` prints the defaults.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    full = TRACEBACK_FLAG in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != TRACEBACK_FLAG]
    setup_logging()
    if args and args[0] in ("-h", "--help"):
        print_help(config_name, doc)
        return
    try:
        cfg = compose(config_name, args)
        run(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as error:
        if full or not is_user_error(error):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def print_help(config_name: str, doc: str | None) -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize
    from omegaconf import OmegaConf

    with initialize(version_base=None):
        cfg = hydra_compose(config_name=config_name)
    print((doc or "").strip() + "\n\nDefaults (override with key=value; --traceback shows a failure's traceback):\n")
    print(OmegaConf.to_yaml(cfg))


def local_ray_system_config(num_cpus: int) -> dict[str, int]:
    """Ray settings of a local cluster (this machine's, or a test session's): idle worker processes are kept for ten
    minutes instead of Ray's one second, up to three per CPU. A process that ran a decode task or hosted an actor's
    imports has paid seconds of CPU for torch and the pipeline, which the next stage or job then reuses; with Ray's
    defaults each stage started over and imports took most of a small job's time. The raylet's warning that N
    worker processes are 'Kx the maximum expected startup concurrency' counts these idle workers with the actors; it
    limits nothing (docs/troubleshooting.md)."""
    return {"num_workers_soft_limit": 3 * num_cpus, "idle_worker_killing_time_threshold_ms": 600_000}


def local_train_environment(health_check_s: float = 0.5) -> None:
    """Ray Train's settings for a run on a local cluster, as environment variables that Ray Train hands from the
    driver to its controller and workers (a variable already set wins).

    - The controller polls its few workers often: each `ray.train.report` (a checkpoint) waits for that poll, 2 s by
      default, which clusters keep.
    - No preemption watcher: it is one more actor process a run, started after the worker group (seconds of CPU on
      2 cores), and watches for spot nodes being taken away, which a single machine has none of.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(health_check_s))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def ensure_ray(min_cpus: float = 0) -> None:
    """Start a new local Ray unless one is running in this process or RAY_ADDRESS names a cluster
    (`RAY_ADDRESS=auto` joins a cluster started on this machine with `ray start`).

    A local cluster gets at least `min_cpus` logical CPUs: a training job's workers hold their CPUs for the whole
    run, and Ray Data's read tasks need CPUs of their own beside them, or the job waits forever on a laptop with
    fewer cores than workers plus readers. Logical CPUs above the physical count only let the OS share the cores.
    """
    import ray

    quiet_ray()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") and os.environ.get(LOCAL_RAY_OWNER) != str(os.getpid()):
        ray.init(logging_level=logging.WARNING)
        return
    local_train_environment()
    start_local_ray(max(os.cpu_count() or 1, int(-(-min_cpus // 1))), logging_level=logging.WARNING)


# Set beside RAY_ADDRESS by the process that started that local cluster: its own later start after a shutdown
# starts a new one, while a child process (which inherits both) joins its parent's cluster.
LOCAL_RAY_OWNER = "SD3_LOCAL_RAY_OWNER"


def start_local_ray(num_cpus: int, **init: Any) -> str:
    """Start a local Ray cluster with `num_cpus` logical CPUs and export its address as RAY_ADDRESS to every process
    it starts (the raylet hands its environment to each worker) and to this one; returns the address.

    Without it a second local cluster on the machine (another job's) breaks whatever in the job asks Ray's state API
    without an address: it finds two clusters and gives up ("Found multiple active Ray instances"), as Ray Train's
    placement group cleaner does on every run. The GCS port is chosen here, since the workers' environment is fixed
    before the cluster exists; `ray.init(address="local")` ignores RAY_ADDRESS.
    """
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    before = {name: os.environ.get(name) for name in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS", LOCAL_RAY_OWNER)}
    os.environ.update({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": address, LOCAL_RAY_OWNER: str(os.getpid())})
    try:
        ray.init(address="local", num_cpus=num_cpus, _system_config=local_ray_system_config(num_cpus),
                 runtime_env=local_runtime_env(), **init)
    except BaseException:
        _restore(before)
        raise
    _restore({"RAY_GCS_SERVER_PORT": before["RAY_GCS_SERVER_PORT"]})
    return address


def stop_local_ray() -> None:
    """Shut down this process's Ray; when this process started that cluster (`start_local_ray`), its RAY_ADDRESS goes
    with it, so nothing later in the process (Ray's job client, another `ensure_ray`) reaches for a dead cluster."""
    import ray

    ray.shutdown()
    if os.environ.get(LOCAL_RAY_OWNER) == str(os.getpid()):
        _restore({"RAY_ADDRESS": None, LOCAL_RAY_OWNER: None})


def _restore(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port() -> int:
    """A TCP port no process on this machine listens on now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def quiet_ray() -> None:
    """Ray's own chatter reduced to what a user needs: warnings and errors (training turns Ray Data's progress bars
    off itself, preprocessing keeps one in a terminal)."""
    # Ray Train 2.60 sends workers' print() to its logger and, when stdout is wrapped, to stdout as well: every
    # progress line showed twice. Ray Train hands this variable from the driver to its controller and workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Data's processes (a training split's coordinator, preprocessing's actors) log each dataset execution at
    # INFO, once per training epoch; warnings are what a user needs. Read by Ray Data in every process it starts.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_ray_data_progress()
    # Ray seam: Ray Train 2.60's worker context logs every `ray.train.report` as a raw `TrainingReport(...)` line on
    # a logger named after its file, outside the `ray` hierarchy.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def local_runtime_env() -> dict[str, str]:
    """The runtime environment of the local clusters started here: `quiet_worker` runs in each worker process before
    its first task (a new dict each time: `ray.init` rewrites the one it gets)."""
    return {"worker_process_setup_hook": f"{__name__}.{quiet_worker.__name__}"}


def quiet_worker() -> None:
    """Per worker process, the notices each would otherwise print into the job's console once, at their sources."""
    quiet_ray_data_progress()
    # transformers draws a "Writing model shards" bar for every save_pretrained (the tiny models a worker builds);
    # huggingface_hub reads this at its import, and transformers takes its setting from there.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Ray seam: Ray Train 2.60's controller builds `DataConfig.default_ingest_options()` for its state export, which
    # sets the deprecated `ExecutionOptions.exclude_resources` itself, warning on every run; ours never set it.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated",
                            category=DeprecationWarning)


def quiet_ray_data_progress() -> None:
    """Ray Data warns "Progress bars disabled" once in each process that runs a dataset with its bars off, as the
    jobs do on purpose (training's split coordinator, dedup, evaluation). The logger carries only such notices about
    the progress display."""
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def code_version() -> str:
    """The installed package's version and the checkout's commit, for the manifests jobs write."""
    try:
        version = importlib.metadata.version("sd3-train")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed (a GPU machine's run)
        version = "0+checkout"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        return f"{version}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return version

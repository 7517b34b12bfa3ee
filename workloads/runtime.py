"""The jobs' edges (command line, logging, the connection to Ray) live in `pipelines.runtime`, below both the
preprocessing jobs and these; re-exported here for the jobs in `workloads/`."""

from pipelines.runtime import *  # noqa: F403

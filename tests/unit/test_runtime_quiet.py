"""The worker setup hook of the local clusters: it is found by the name Ray imports, and it quietens exactly the
notices it names (a different deprecation still shows)."""

from __future__ import annotations

import importlib
import logging
import warnings

import pytest

from pipelines import runtime

PROGRESS_LOGGER = "ray.data._internal.progress"


@pytest.fixture
def restored(monkeypatch):
    """The process state the hook changes, put back after the test."""
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "unset")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    progress = logging.getLogger(PROGRESS_LOGGER)
    level = progress.level
    with warnings.catch_warnings():
        yield
    progress.setLevel(level)


def test_the_hook_is_importable_by_the_name_ray_is_given():
    module, name = runtime.local_runtime_env()["worker_process_setup_hook"].rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is runtime.quiet_worker
    assert runtime.local_runtime_env() is not runtime.local_runtime_env()  # ray.init rewrites the dict it gets


def test_quiet_worker_silences_its_notices_only(restored):
    import os

    runtime.quiet_worker()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    progress = logging.getLogger(PROGRESS_LOGGER)
    assert not progress.isEnabledFor(logging.WARNING) and progress.isEnabledFor(logging.ERROR)
    assert logging.getLogger("ray.data._internal.execution").level == logging.NOTSET  # its siblings untouched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.quiet_worker()  # filters go in front of "always"
        warnings.warn("`ExecutionOptions.exclude_resources` is deprecated and will be removed", DeprecationWarning,
                      stacklevel=1)
        warnings.warn("`ExecutionOptions.actor_locality_enabled` is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`ExecutionOptions.actor_locality_enabled` is deprecated"]

"""Both tiers. Under `make test` (two pytest-xdist workers) each worker takes one tier whole: one runs the integration
tier in order, with its one Ray and one S3 server, while the other runs the unit tier's compute in the first's waits on
Ray's process starts."""

from __future__ import annotations

import pytest


@pytest.hookimpl(optionalhook=True)  # called by pytest-xdist only
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    # xdist's own `--dist loadgroup` does not group under pytest 9.2 (it writes the group into `item._nodeid`, which
    # pytest no longer reads), so the tier comes from the test's path: tests/<tier>/...
    from xdist.scheduler import LoadScopeScheduling

    class ByTier(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("/", 2)[1]

    return ByTier(config, log)

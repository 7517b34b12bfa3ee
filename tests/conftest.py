"""Both tiers: under `make test` (pytest-xdist, `--dist loadgroup`) each tier is one group, so one worker runs the
integration tier in order (one Ray and one S3 server for it) while the other runs the unit tier beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.relative_to(TESTS).parts[0]  # "unit" or "integration"
        item.add_marker(pytest.mark.xdist_group(tier))

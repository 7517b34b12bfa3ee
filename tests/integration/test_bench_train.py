"""The training benchmark on the session's local Ray: streaming overhead and ZeRO state bytes are reported."""

from __future__ import annotations

import pytest


def test_bench_train_reports_overhead_and_zero_bytes(ray_local, capsys):
    from conf.bench import BenchTrainConf
    from workloads.bench import train as bench_train

    figures = bench_train.run(BenchTrainConf(rows=64, latent_size=8, batch_size=8, warmup=1, steps=2,
                                             memory_stages=[1, 3]))
    assert figures["stream_s"] > 0 and figures["memory_s"] > 0
    for stage in (1, 3):
        assert figures[f"zero{stage}_bytes"] == pytest.approx(figures[f"zero{stage}_expected"], rel=0.01)
    assert "overhead" in capsys.readouterr().out

"""The training benchmark on the session's local Ray with two workers: streaming overhead and each rank's ZeRO
state bytes are reported, and ZeRO-3 holds half of the weights per rank."""

from __future__ import annotations

import pytest


def test_bench_train_reports_overhead_and_zero_bytes(ray_local, capsys):
    from conf.bench import BenchTrainConf
    from model import count_params
    from workloads.bench import train as bench_train

    cfg = BenchTrainConf(rows=64, latent_size=8, batch_size=8, warmup=1, steps=2, num_workers=2,
                         memory_stages=[1, 2, 3])
    figures = bench_train.run(cfg)
    assert figures["stream_s"] > 0 and figures["memory_s"] > 0
    for stage in (1, 2, 3):
        assert len(figures[f"zero{stage}_bytes_per_rank"]) == 2
        for measured in figures[f"zero{stage}_bytes_per_rank"]:
            assert measured == pytest.approx(figures[f"zero{stage}_expected"], rel=0.01)
    weight_bytes = 4 * count_params(cfg.model.build())  # fp32 on the CPU
    for zero2, zero3 in zip(figures["zero2_bytes_per_rank"], figures["zero3_bytes_per_rank"], strict=True):
        assert zero2 - zero3 == pytest.approx(weight_bytes / 2, rel=0.02)  # ZeRO-3: half the weights per rank
    printed = capsys.readouterr().out
    assert "overhead" in printed and "2 workers" in printed

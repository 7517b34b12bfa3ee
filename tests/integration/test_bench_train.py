"""The training benchmark on the session's local Ray with two workers: streaming overhead and each rank's ZeRO
state bytes are reported, ZeRO-3 holds half of the weights per rank, and a sample moves one caption's embeddings."""

from __future__ import annotations

import math

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
    from model.conditioning import TINY_TEXT
    from pipelines import schema

    caption = 2 * sum(math.prod(shape) for shape in schema.embedding_shapes(TINY_TEXT).values())  # fp16 on storage
    latent = 2 * 16 * cfg.latent_size**2
    assert figures["all_columns_bytes"] == latent + 2 * caption  # before: both captions went to the device
    assert figures["one_caption_bytes"] == latent + caption
    assert figures["one_caption_h2d_s"] is None and "none on a CPU run" in printed

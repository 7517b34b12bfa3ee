"""ZeRO on two ranks (two spawned processes, a gloo group set up by DeepSpeed, the CPU): ZeRO-3 builds and trains
the same network as ZeRO-2 while each rank holds half of it, and each stage's per-rank state bytes match the ZeRO
paper's expectation. One process pair runs every check: starting it and importing DeepSpeed dominate the time."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import random_batch

from conf.train import TrainConf
from model import FLAVORS, MMDiT
from model.conditioning import TINY_TEXT
from workloads.train.distribute import expected_state_bytes, full_from_shards, local_shards, measured_state_bytes

WORLD = 2
STAGES = (0, 1, 2, 3)


def conf(stage: int) -> TrainConf:
    cfg = TrainConf(data="unused")
    cfg.deepspeed.stage = stage
    cfg.trainer.num_workers, cfg.trainer.batch_size = WORLD, 4  # 2 samples per rank
    cfg.optim.lr, cfg.optim.warmup_steps = 2e-3, 1
    return cfg


def batch(seed: int = 0, n: int = 2) -> dict[str, torch.Tensor]:
    return random_batch(seed, n)


def trainer(stage: int):
    from workloads.train.trainer import Trainer

    return Trainer(conf(stage), TINY_TEXT, torch.device("cpu"))


def weights(t) -> dict[str, torch.Tensor]:
    """The full parameters as this rank sees them; under ZeRO-3 gathered by DeepSpeed itself, not our code."""
    import deepspeed

    params = list(t.module.named_parameters())
    if t.stage != 3:
        return {n: p.detach().clone() for n, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def rank_checks() -> dict:
    """Everything one rank measures; each rank trains on its own batches, as in data parallel training."""
    rank = dist.get_rank()
    out: dict = {}
    plain, sharded = trainer(2), trainer(3)
    out["shard_numel"] = [p.ds_tensor.numel() for p in sharded.module.parameters()]
    out["init"] = weights(plain), weights(sharded)
    out["full_from_shards"] = full_from_shards(sharded.module, local_shards(sharded.module, 3), 3, torch.device("cpu"))
    # adaLN-Zero: the output is 0 until step 1 moves the final layer, the gates move at step 2, and only from step 3
    # on does every weight get a gradient (and the loss depend on every weight).
    out["losses"] = [(plain.step(batch(10 * rank + s), s).loss, sharded.step(batch(10 * rank + s), s).loss)
                     for s in (1, 2, 3, 4)]
    out["trained"] = weights(plain), weights(sharded)
    del plain, sharded
    for stage in STAGES:
        t = trainer(stage)
        t.step(batch(rank), 1)
        out[f"bytes{stage}"] = measured_state_bytes(t.module, t.optimizer, stage)
        del t
    return out


def _rank_main(rank: int, port: int, folder: str) -> None:
    from workloads.train.distribute import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))  # what Ray Train sets in its workers
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    try:
        torch.save(rank_checks(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("zero-two-ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def numels() -> list[int]:
    return [p.numel() for p in MMDiT(FLAVORS["debug"]).parameters()]


def test_zero3_builds_the_same_weights_as_zero2_and_each_rank_holds_half(ranks, numels):
    for got in ranks:
        plain, sharded = got["init"]
        assert sharded.keys() == plain.keys()
        for name, value in plain.items():
            torch.testing.assert_close(sharded[name], value, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(got["full_from_shards"][name], value, rtol=0, atol=0, msg=name)
        assert got["shard_numel"] == [math.ceil(n / WORLD) for n in numels]  # half of each tensor, padded


def test_zero3_trains_like_zero2(ranks):
    for got in ranks:
        for plain, sharded in got["losses"]:
            assert sharded == pytest.approx(plain, rel=1e-5)
        plain, sharded = got["trained"]
        for name, value in plain.items():
            torch.testing.assert_close(sharded[name], value, msg=name)
        # every weight moved, except the text queries' norm of the last block, whose text outputs are dropped
        unchanged = [n for n, v in plain.items() if torch.equal(v, got["init"][0][n])]
        assert unchanged == [f"blocks.{FLAVORS['debug'].depth - 1}.txt.q_norm.weight"]
    # the ranks saw different batches, yet hold the same (all-reduced) weights
    for name, value in ranks[0]["trained"][1].items():
        torch.testing.assert_close(ranks[1]["trained"][1][name], value, rtol=0, atol=0, msg=name)


def test_state_bytes_per_rank_match_the_zero_expectation(ranks, numels):
    params = sum(numels)
    for got in ranks:
        for stage in STAGES:
            assert got[f"bytes{stage}"] == pytest.approx(expected_state_bytes(params, WORLD, stage, 4), rel=0.01)
        # ZeRO-3 partitions the (fp32) weights themselves: half of them per rank on two ranks
        assert got["bytes2"] - got["bytes3"] == pytest.approx(params * 4 / WORLD, rel=0.02)

"""ZeRO on two ranks (two spawned processes, a gloo group set up by DeepSpeed, the CPU): ZeRO-3 builds and trains
the same network as ZeRO-2 while each rank holds half of it, each stage's per-rank state bytes match the ZeRO
paper's expectation, and LoRA trains only its adapters under both stages, checkpoints only them and resumes
exactly, and muP's per-group learning rates train alike under both. One process pair runs every check: starting it
and importing DeepSpeed dominate the time."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import random_step_batch

from conf.model import ModelConf
from conf.train import TrainConf
from model import FLAVORS, MMDiT
from model.conditioning import TINY_TEXT
from workloads.train.checkpointing import TrainState
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
    return random_step_batch(seed, n)


def trainer(stage: int, model: ModelConf | None = None):
    from workloads.train.trainer import Trainer

    cfg = conf(stage)
    cfg.model = model or cfg.model
    return Trainer(cfg, TINY_TEXT, torch.device("cpu"))


# muP at 1.5x the debug flavor's width (its base width): hidden matrices at 2/3 of the base learning rate
MUP = ModelConf("debug", hidden_size=192, num_heads=3, parametrization="mup")


def mup_checks(stage: int) -> dict:
    """muP's learning-rate groups, three steps' losses and the weights after them, under `stage`."""
    rank = dist.get_rank()
    t = trainer(stage, MUP)
    out = {"lrs": [g["lr"] for g in t.optimizer.param_groups],
           "losses": [t.step(batch(10 * rank + s), s).loss for s in (1, 2, 3)]}
    out["weights"] = weights(t)
    return out


LORA_RANK = 4


def base_weights() -> dict[str, torch.Tensor]:
    """A trained-looking base (every weight non-zero, so adapters anywhere change the output), the same on each rank."""
    torch.manual_seed(7)
    net = MMDiT(FLAVORS["debug"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.state_dict()


def lora_trainer(stage: int, base: dict[str, torch.Tensor]):
    """A LoRA trainer on `base`, as `init_from=` loads it (rank 0 loads, DeepSpeed spreads or partitions it)."""
    from conf.train import LoraConf
    from workloads.train.trainer import Trainer

    cfg = conf(stage)
    cfg.init_from, cfg.lora = "the base", LoraConf(rank=LORA_RANK)
    return Trainer(cfg, TINY_TEXT, torch.device("cpu"), lambda net: net.load_state_dict(base))


def lora_checks(stage: int, folder: Path) -> dict:
    """Train 2 steps, checkpoint, step 3; then a fresh trainer resumes from the checkpoint and takes step 3 again."""
    rank, base = dist.get_rank(), base_weights()
    t = lora_trainer(stage, base)
    out: dict = {"losses": [t.step(batch(10 * rank + s), s).loss for s in (1, 2)]}
    checkpoint = folder / f"lora{stage}"
    checkpoint.mkdir(exist_ok=True)
    t.save(checkpoint, TrainState(step=2, world_size=WORLD, zero_stage=stage))
    dist.barrier()
    out["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    out["losses"].append(t.step(batch(10 * rank + 3), 3).loss)
    out["weights"] = weights(t)
    out["trained_numel"], out["optimizer_bytes"] = t.trained_numel, measured_state_bytes(t.module, t.optimizer, stage)
    out["ema_state"] = t.ema_state_dict()
    del t
    resumed = lora_trainer(stage, base)
    resumed.load(checkpoint)
    out["resumed_loss"] = resumed.step(batch(10 * rank + 3), 3).loss
    out["resumed_weights"] = weights(resumed)  # after the update: the optimizer's moments were resumed too
    return out


def weights(t) -> dict[str, torch.Tensor]:
    """The full parameters as this rank sees them; under ZeRO-3 gathered by DeepSpeed itself, not our code."""
    import deepspeed

    params = list(t.module.named_parameters())
    if t.stage != 3:
        return {n: p.detach().clone() for n, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def rank_checks(folder: Path) -> dict:
    """Everything one rank measures; each rank trains on its own batches, as in data parallel training."""
    rank = dist.get_rank()
    out: dict = {}
    plain, sharded = trainer(2), trainer(3)
    out["shard_numel"] = [p.ds_tensor.numel() for p in sharded.module.parameters()]
    out["init"] = weights(plain), weights(sharded)
    named = list(sharded.module.named_parameters())
    out["full_from_shards"] = full_from_shards(named, local_shards(named, 3), 3, torch.device("cpu"))
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
    for stage in (2, 3):
        out[f"lora{stage}"] = lora_checks(stage, folder)
        out[f"mup{stage}"] = mup_checks(stage)
    return out


def _rank_main(rank: int, port: int, folder: str) -> None:
    from workloads.train.distribute import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))  # what Ray Train sets in its workers
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    try:
        torch.save(rank_checks(Path(folder)), Path(folder) / f"rank{rank}.pt")
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


def test_lora_trains_only_the_adapters_alike_under_zero2_and_zero3(ranks):
    from conf.train import LoraConf
    from workloads.train.lora import lora_numel

    base = base_weights()
    expected_numel = lora_numel(FLAVORS["debug"], LoraConf(rank=LORA_RANK))
    for got in ranks:
        z2, z3 = got["lora2"], got["lora3"]
        assert z3["losses"] == pytest.approx(z2["losses"], rel=1e-5)
        assert z2["trained_numel"] == z3["trained_numel"] == expected_numel
        for name, value in z2["weights"].items():
            torch.testing.assert_close(z3["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
            if ".base_layer." in name or ".lora_" not in name:  # the base: exactly as loaded
                assert torch.equal(value, base[name.replace(".base_layer.", ".")]), name
        moved = [n for n, v in z2["weights"].items() if ".lora_B." in n and v.abs().max() > 0]
        assert len(moved) == len([n for n in z2["weights"] if ".lora_B." in n]) > 0
    # the rank-0 EMA state: the whole network under both stages (ZeRO-3 gathered), None on the other rank
    assert ranks[1]["lora2"]["ema_state"] is None and ranks[1]["lora3"]["ema_state"] is None
    e2, e3 = ranks[0]["lora2"]["ema_state"], ranks[0]["lora3"]["ema_state"]
    assert e2 and e2.keys() == e3.keys() and all(torch.allclose(e3[k], e2[k], atol=1e-6) for k in e2)


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(ranks, numels):
    for got in ranks:
        for stage in (2, 3):
            z = got[f"lora{stage}"]
            assert z["resumed_loss"] == z["losses"][2]  # the same step 3 after a resume
            for name, value in z["weights"].items():  # and the same update: Adam's moments came back
                torch.testing.assert_close(z["resumed_weights"][name], value, rtol=1e-6, atol=0, msg=name)
    for stage in (2, 3):
        total = ranks[0][f"lora{stage}"]["checkpoint_bytes"]  # the folder both ranks wrote into
        adapters = ranks[0][f"lora{stage}"]["trained_numel"]
        # fp32 adapters, their EMA, two Adam moments and DeepSpeed's fp32 master: ~5 copies, far below the base
        assert total < 12 * 4 * adapters + 200_000, (stage, total)
        assert total < 0.5 * sum(numels) * 4, (stage, total)


def test_mup_groups_train_alike_under_zero2_and_zero3_on_two_ranks(ranks):
    """muP's groups (hidden matrices at base width / width of the learning rate) through DeepSpeed's optimizer
    partitioned over two ranks: ZeRO-3 takes the same steps as ZeRO-2, and both ranks end with the same weights."""
    for got in ranks:
        z2, z3 = got["mup2"], got["mup3"]
        assert z2["lrs"] == z3["lrs"] and z2["lrs"][1] == pytest.approx(z2["lrs"][0] * 128 / 192)
        assert z3["losses"] == pytest.approx(z2["losses"], rel=1e-5)
        for name, value in z2["weights"].items():
            torch.testing.assert_close(z3["weights"][name], value, msg=name)
    for name, value in ranks[0]["mup3"]["weights"].items():
        torch.testing.assert_close(ranks[1]["mup3"]["weights"][name], value, rtol=0, atol=0, msg=name)

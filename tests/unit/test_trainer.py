"""One rank's trainer in this process (a 1-process gloo group): overfitting, non-finite steps, EMA, checkpoints,
resolution-stage initialisation, and the training job's start-up checks. ZeRO across ranks (sharded construction,
per-rank state bytes) is checked on two processes in tests/integration/test_zero_two_ranks.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from support import random_batch, random_step_batch

from conf.model import ModelConf
from conf.train import TrainConf
from model import FLAVORS, MMDiT
from model.conditioning import TINY_TEXT
from model.interop import export_diffusers
from pipelines import schema
from workloads.train import checkpointing, streaming
from workloads.train.checkpointing import TrainState
from workloads.train.distribute import deepspeed_config, expected_state_bytes, init_distributed
from workloads.train.driver import check
from workloads.train.ema import EMA
from workloads.train.worker import track_nonfinite


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = pytest.MonkeyPatch()
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        env.setenv(name, value)  # what Ray Train sets in its workers; DeepSpeed reads LOCAL_RANK
    init_distributed(torch.device("cpu"))  # as the workers do: gloo, and no JIT build of a shared-memory op
    yield
    dist.destroy_process_group()
    env.undo()


def conf(stage: int = 2, **trainer) -> TrainConf:
    cfg = TrainConf(data="unused")
    cfg.deepspeed.stage = stage
    cfg.trainer.num_workers, cfg.trainer.batch_size = 1, 4
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    cfg.optim.lr, cfg.optim.warmup_steps = 2e-3, 1
    cfg.ema.decay = 0.5
    return cfg


def batch(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    return random_step_batch(seed, n)


def trainer(cfg: TrainConf, load=None):
    from workloads.train.trainer import Trainer

    return Trainer(cfg, TINY_TEXT, torch.device("cpu"), load)


@pytest.mark.parametrize("stage", [2, 3])
def test_overfitting_one_batch_drives_the_loss_down(process_group, stage):
    t = trainer(conf(stage))
    fixed = batch()
    losses = [t.step(fixed, step).loss for step in range(1, 61)]
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])  # fresh noise and t each step: not to zero


@pytest.mark.parametrize("stage, offload", [(2, False), (3, False), (3, True)])
def test_mup_groups_keep_their_learning_rates_through_the_warmup(process_group, stage, offload):
    """DeepSpeed's optimizer keeps muP's groups (hidden weights at base/width = 1/2 the learning rate here) under
    ZeRO-2, ZeRO-3 and ZeRO-3 with the optimizer offloaded, and the warm-up scales each; the step reports the base
    learning rate."""
    cfg = conf(stage)
    cfg.deepspeed.offload = offload
    cfg.model = ModelConf("debug", hidden_size=256, num_heads=4, parametrization="mup")
    cfg.optim.warmup_steps = 4
    t = trainer(cfg)
    for step in range(1, 4):
        assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([2e-3 * step / 4, 1e-3 * step / 4])
        result = t.step(batch(), step)
        assert not result.skipped and result.lr == pytest.approx(2e-3 * step / 4)


def test_the_learning_rate_warms_up_holds_and_decays_over_the_last_steps(process_group):
    """optim.decay_steps: linear decay over the last steps of max_steps, to lr/decay_steps at the last one."""
    cfg = conf(2, max_steps=8)
    cfg.optim.warmup_steps, cfg.optim.decay_steps = 2, 4
    t = trainer(cfg)
    lrs = [t.step(batch(), step).lr for step in range(1, 9)]
    assert lrs == pytest.approx([2e-3 * f for f in (0.5, 1, 1, 1, 1, 0.75, 0.5, 0.25)])


def test_nonfinite_loss_skips_the_step_without_touching_the_weights(process_group):
    t = trainer(conf(2))
    bad = batch()
    bad[schema.LATENT][0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in t.module.parameters()]
    result = t.step(bad, 1)
    assert result.skipped and np.isnan(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, t.module.parameters(), strict=True))
    assert not t.step(batch(), 2).skipped


def test_checkpoint_final_false_skips_the_last_steps_checkpoint_only():
    """`checkpoint.final=false` (a benchmark that must not write tens of GB): no checkpoint at a last step that is no
    multiple of `every`; in between, every N steps as before. (A save needs a Ray Train worker: the trainer here is
    None, so any save attempt would raise.)"""
    from workloads.train.checkpointing import Checkpointer

    assert TrainConf(data="unused").checkpoint.final is True
    at_end, not_at_end = Checkpointer(None, 5, None), Checkpointer(None, 5, None, at_end=False)
    for checkpointer in (at_end, not_at_end):
        assert checkpointer.maybe_save(TrainState(step=3), final=False, metrics={}) is False
    assert not_at_end.maybe_save(TrainState(step=3), final=True, metrics={}) is False
    with pytest.raises(AttributeError):  # the default does save at the end
        at_end.maybe_save(TrainState(step=3), final=True, metrics={})


def test_consecutive_nonfinite_steps_stop_the_run():
    state = TrainState()
    for skipped in (True, True, False, True, True):
        track_nonfinite(state, skipped, limit=3)
    assert (state.skipped, state.nonfinite_run) == (4, 2)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        track_nonfinite(state, True, limit=3)


def test_ema_follows_the_weights_with_warmup():
    weight = torch.zeros(3)
    ema = EMA([weight], decay=0.9, warmup=True)
    weight += 1.0
    ema.update()  # decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    with ema.applied():
        assert torch.allclose(weight, torch.full((3,), 0.9))
    assert torch.equal(weight, torch.ones(3))
    with pytest.raises(ValueError, match="decay"):
        EMA([weight], decay=1.0)


def test_ema_of_bf16_weights_casts_a_chunk_at_a_time_with_the_same_result():
    """The fp32 casts of bf16 weights are made per chunk of at most `chunk_bytes` (a tensor above it alone), and the
    shadow is bitwise what one update over all tensors gives."""
    from workloads.train.ema import chunked

    torch.manual_seed(0)
    weights = [torch.randn(n, dtype=torch.bfloat16) for n in (300, 10, 40, 1000, 5)]
    assert chunked([w.float() for w in weights], 1300) == [[0, 1], [2], [3], [4]]
    whole, parts = EMA(weights, 0.9, chunk_bytes=2**40), EMA(weights, 0.9, chunk_bytes=1300)
    for _ in range(3):
        for w in weights:
            w.add_(torch.randn_like(w))
        whole.update()
        parts.update()
    assert len(parts.chunks) == 4 and all(torch.equal(a, b) for a, b in zip(whole.shadow, parts.shadow, strict=True))


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_round_trip_continues_identically(process_group, stage, tmp_path):
    t = trainer(conf(stage))
    for step in range(1, 4):
        t.step(batch(step), step)
    t.save(tmp_path, TrainState(step=3, world_size=1, zero_stage=stage))
    assert checkpointing.is_complete(*_local(tmp_path))
    saved_ema = {k: v.clone() for k, v in t.ema_model().state_dict().items()}  # under ZeRO-2 it aliases the shadow
    expected = [t.step(batch(step), step).loss for step in (4, 5)]
    fresh = trainer(conf(stage))
    assert fresh.load(tmp_path).step == 3
    assert [fresh.step(batch(step), step).loss for step in (4, 5)] == expected
    names, tensors = checkpointing.full_ema(tmp_path)
    assert names == [n for n, _ in t.module.named_parameters()]
    for name, tensor in zip(names, tensors, strict=True):  # the EMA as it was at the save, whole
        torch.testing.assert_close(tensor, saved_ema[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_resumes_only_under_the_parametrization_it_was_trained_with(process_group, tmp_path):
    """The checkpoint records its parametrization (muP with its base width): a run under another one refuses it
    naming both, before DeepSpeed loads optimizer groups that would not match; a checkpoint from before the record
    still loads."""
    cfg = conf(2)
    cfg.model = ModelConf("debug", hidden_size=256, num_heads=4, parametrization="mup")
    t = trainer(cfg)
    t.step(batch(), 1)
    t.save(tmp_path, TrainState(step=1, world_size=1, zero_stage=2))
    assert checkpointing.read_state(tmp_path).parametrization == "mup (base width 128)"
    sp = conf(2)
    sp.model = ModelConf("debug", hidden_size=256, num_heads=4)
    with pytest.raises(ValueError, match=r"trained under mup \(base width 128\); this run sets sp"):
        trainer(sp).load(tmp_path)
    cfg.model.mup_base_width = 64
    with pytest.raises(ValueError, match=r"this run sets mup \(base width 64\)"):
        trainer(cfg).load(tmp_path)
    state = json.loads((tmp_path / checkpointing.STATE_FILE).read_text())
    state.pop("parametrization")
    (tmp_path / checkpointing.STATE_FILE).write_text(json.dumps(state))
    cfg.model.mup_base_width = 128
    assert trainer(cfg).load(tmp_path).step == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_blocks_train_resume_and_validate_like_eager(process_group, stage, tmp_path):
    """`trainer.compile` (aot_eager here: the same capture as inductor without its code generation) with activation
    checkpointing under ZeRO 2 and 3: the same losses as eager, the EMA swapped in for validation, and a checkpoint of
    the compiled run resumed by a compiled trainer continues identically."""
    from workloads.train.validation import ValGroup

    rows = {k: v.numpy() for k, v in random_batch(seed=3, n=4).items()}
    group = ValGroup("bucket=64x64", rows, [f"caption {i}" for i in range(4)], np.arange(4))
    runs = {}
    for compiled in (False, True):
        t = trainer(conf(stage, compile=compiled, compile_backend="aot_eager", activation_checkpointing=True))
        assert t.compiled == compiled
        runs[compiled] = ([t.step(batch(step), step).loss for step in range(1, 4)], t.validate([group]), t)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-6)  # EMA weights, eval mode
    t = runs[True][2]
    t.save(tmp_path, TrainState(step=3, world_size=1, zero_stage=stage))
    expected = [t.step(batch(step), step).loss for step in (4, 5)]
    fresh = trainer(conf(stage, compile=True, compile_backend="aot_eager", activation_checkpointing=True))
    fresh.load(tmp_path)
    assert [fresh.step(batch(step), step).loss for step in (4, 5)] == expected


def _local(folder: Path):
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(folder)


def test_a_checkpoint_missing_a_file_is_never_resumed(process_group, tmp_path):
    t = trainer(conf(2))
    for step in (4, 8):
        folder = tmp_path / checkpointing.dir_name(step)
        folder.mkdir()
        t.save(folder, TrainState(step=step, world_size=1, zero_stage=2))
    (tmp_path / checkpointing.dir_name(8) / checkpointing.ema_name(0)).unlink()
    assert checkpointing.find_latest(str(tmp_path)).uri.endswith(checkpointing.dir_name(4))
    (tmp_path / checkpointing.dir_name(4) / checkpointing.STATE_FILE).write_text("{")  # truncated
    assert checkpointing.find_latest(str(tmp_path)) is None


def test_resuming_with_another_world_size_is_a_clear_error(process_group, tmp_path):
    t = trainer(conf(2))
    t.save(tmp_path, TrainState(step=1, world_size=1, zero_stage=2))
    state = json.loads((tmp_path / checkpointing.STATE_FILE).read_text())
    (tmp_path / checkpointing.STATE_FILE).write_text(json.dumps({**state, "world_size": 4}))
    with pytest.raises(ValueError, match="written by 4 workers"):
        t.load(tmp_path)


@pytest.mark.parametrize("stage", [2, 3])
def test_init_from_a_previous_stage_starts_from_its_weights(process_group, stage, tmp_path):
    from workloads.train.initialize import weight_loader

    torch.manual_seed(7)
    previous = MMDiT(FLAVORS["debug"])
    for p in previous.parameters():
        p.data.normal_(std=0.02)
    export_diffusers(previous, tmp_path / "run" / "export")
    t = trainer(conf(stage), load=weight_loader(str(tmp_path / "run")))
    got = t.ema_model().state_dict()
    for name, value in previous.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("on_gpu, offload, torch_adam, expected", [
    (False, False, None, (True, False)),  # CPU: torch's AdamW
    (True, False, None, (True, True)),  # GPU: torch's fused AdamW, nothing to build
    (True, True, None, (False, False)),  # offloaded from a GPU: DeepSpeed's CPU Adam
    (True, False, False, (False, False)),  # asked for: DeepSpeed's fused Adam (JIT-built with nvcc)
])
def test_adamw_is_torchs_fused_kernel_on_gpu_unless_deepspeeds_is_asked_for(on_gpu, offload, torch_adam, expected):
    cfg = conf(stage=3 if offload else 2)
    cfg.deepspeed.offload, cfg.deepspeed.torch_adam = offload, torch_adam
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, 8, 2, bf16=on_gpu, on_gpu=on_gpu)
    params = ds["optimizer"]["params"]
    assert (params["torch_adam"], params.get("fused", False)) == expected
    assert ds["zero_force_ds_cpu_optimizer"] == (not params["torch_adam"])


def test_deepspeed_hands_the_fused_flag_to_torchs_adamw(process_group):
    """The GPU default's optimizer params, given to DeepSpeed's engine here (torch's fused AdamW also runs on CPU):
    DeepSpeed builds torch.optim.AdamW with fused=True, so on a GPU no op is compiled."""
    import deepspeed

    cfg = conf()
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, 4, 1, bf16=False, on_gpu=True)
    net = torch.nn.Linear(4, 4)
    engine, optimizer, _, _ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=ds)
    inner = getattr(optimizer, "optimizer", optimizer)
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True
    engine.backward(engine(torch.randn(4, 4)).square().mean())
    engine.step()


def test_expected_state_bytes_follow_the_zero_paper():
    assert expected_state_bytes(100, 4, 0, 4) == pytest.approx(100 * (4 + 8))  # fp32 without ZeRO: no master copy
    assert expected_state_bytes(100, 4, 2, 2) == pytest.approx(100 * 2 + 100 * 12 / 4)
    assert expected_state_bytes(100, 4, 3, 2) == pytest.approx(100 * (2 + 12) / 4)
    assert expected_state_bytes(100, 4, 1, 2) == pytest.approx(100 * 2 + 100 * 12 / 4)


def test_epoch_schedule_interleaves_buckets_reproducibly():
    batches = {"bucket=64x64": 5, "bucket=80x48": 2}
    first = streaming.epoch_schedule(batches, seed=0, epoch=0)
    assert sorted(first) == ["bucket=64x64"] * 5 + ["bucket=80x48"] * 2
    assert first == streaming.epoch_schedule(batches, seed=0, epoch=0)
    assert any(streaming.epoch_schedule(batches, 0, e) != first for e in range(1, 5))
    assert streaming.batches_per_epoch({"a": 41, "b": 7}, world_size=2, local_batch=4) == {"a": 5, "b": 0}


@pytest.mark.parametrize(
    ("change", "message"),
    [(lambda c: setattr(c.trainer, "batch_size", 7), "divisible by trainer.num_workers"),
     (lambda c: setattr(c.deepspeed, "stage", 4), "deepspeed.stage"),
     (lambda c: setattr(c.objective, "formulation", "nope"), "nope"),
     (lambda c: (setattr(c, "stage_needs_init", True), setattr(c, "stage_resolution", 512)), "init_from"),
     (lambda c: setattr(c.validation, "sampler", "ddim"), "validation.sampler"),
     (lambda c: setattr(c.model, "depth", 0), "depth")],
)
def test_invalid_configs_fail_before_any_work(change, message):
    cfg = conf()
    cfg.trainer.num_workers = 2
    cfg.trainer.batch_size = 8
    change(cfg)
    with pytest.raises(ValueError, match=message):
        check(cfg)


class _Reads(torch.nn.Module):
    """A stand-in network: zero velocity, or (text=True) one that adds the pooled text's mean to every output."""

    def __init__(self, text: bool) -> None:
        super().__init__()
        self.text = text

    def forward(self, x, t, context, pooled):
        out = torch.zeros_like(x)
        return out + pooled.mean(dim=1).view(-1, 1, 1, 1) if self.text else out


def test_shuffled_text_loss_moves_only_for_a_network_that_reads_its_text():
    """`text_gap`'s measurement: each row conditioned on the previous row's text, with the same noise and timesteps:
    a network blind to the text scores the same, one that reads it does not."""
    from workloads.train.validation import ValGroup, distributed_val_loss

    rows = {k: v.numpy() for k, v in random_batch(seed=3, n=6).items()}
    group = ValGroup("bucket=64x64", rows, [f"caption {i}" for i in range(6)], np.arange(6))
    losses = {}
    for reads in (False, True):
        for shuffle in (False, True):
            losses[reads, shuffle] = distributed_val_loss(_Reads(reads), [group], TINY_TEXT, "rf", 4, 0,
                                                          torch.device("cpu"), torch.float32, shuffle_text=shuffle)
    torch.testing.assert_close(losses[False, True], losses[False, False])
    assert not torch.allclose(losses[True, True], losses[True, False])
    assert conf().validation.text_gap  # on by default: every run logs it

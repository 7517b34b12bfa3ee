"""`python -m workloads.bench.train`: what streaming input and ZeRO cost, measured in one Ray Train run.

1. Data wait: the same number of training steps fed by the streaming Ray Data input (the training job's
   `EpochStream`) and by the same batches already in memory, alternating in two rounds on the same workers; the
   overhead is streaming time / in-memory time - 1 (target: under 5%), plus the data-wait share of each step.
2. Memory: for each ZeRO stage, the bytes each rank holds for weights and optimizer state after one step, against
   the ZeRO paper's expectation for AdamW (`workloads.train.distribute.expected_state_bytes`); gradients are not
   counted.
3. Throughput: samples/s and, on GPUs with a known or configured peak, MFU from `model.train_flops`.
4. Input bytes: the bytes a sample moves to the device and the host-to-device time a step, with every tensor column
   (the layout before the caption was chosen on the host) and with one caption's embeddings (`CaptionCollate`, what
   training moves); target: at most 55% of the bytes. On a CPU run there is no copy to time.

Input: `data=` (a preprocessed dataset), else random rows in the same layout written to a temporary folder.
"""

from __future__ import annotations

import functools
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from conf.bench import BenchTrainConf, register_train
from conf.train import TrainConf
from model import count_params
from model.conditioning import SD3_TEXT, TINY_TEXT
from workloads.bench.data import write_random_dataset
from workloads.runtime import cli, ensure_ray
from workloads.train import streaming
from workloads.train.data import check_spec, latent_shape, read_spec


def train_conf(cfg: BenchTrainConf, stage: int) -> TrainConf:
    t = TrainConf(data=cfg.data or "", model=cfg.model)
    t.trainer.num_workers, t.trainer.batch_size, t.trainer.use_gpu = cfg.num_workers, cfg.batch_size, cfg.use_gpu
    t.trainer.activation_checkpointing = cfg.activation_checkpointing
    t.deepspeed.stage = stage
    return t


def timed_steps(trainer, count: int, first_step: int, source: Callable[[int], dict]) -> tuple[float, float]:
    """(wall seconds, seconds waiting for `source`) for `count` steps, every rank in step."""
    dist.barrier()
    start, waiting = time.perf_counter(), 0.0
    for i in range(count):
        tick = time.perf_counter()
        batch = source(i)
        waiting += time.perf_counter() - tick
        trainer.step(batch, first_step + i)
    dist.barrier()
    return time.perf_counter() - start, waiting


def _pull(source: Iterator[dict], kept: list, _index: int) -> dict:
    kept.append(next(source))
    return kept[-1]


def transfer_figures(shards: dict, local_batch: int, device: torch.device, batches: int = 8,
                     synthetic_prob: float = 0.5) -> dict[str, float | None]:
    """Bytes per sample and host-to-device seconds per batch (None on a CPU run) of the first `batches` batches of
    the first shard, for every tensor column and for one caption's; each pass drains its epoch (the split's other
    ranks wait for it)."""
    shard = next(iter(shards.values()))
    cuda = device.type == "cuda"
    figures: dict[str, float | None] = {}
    for layout, collate in (("all_columns", streaming.AllColumns()),
                            ("one_caption", streaming.CaptionCollate(0, 0, synthetic_prob))):
        iterator = iter(shard.iter_torch_batches(batch_size=local_batch, drop_last=True, collate_fn=collate,
                                                 device="cpu", pin_memory=cuda))
        nbytes, seconds, count = 0, 0.0, 0
        for batch in itertools.islice(iterator, batches):
            tick = time.perf_counter()
            moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if cuda:
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - tick
            nbytes, count = nbytes + sum(v.nbytes for v in moved.values()), count + 1
        for _ in iterator:
            pass
        figures[f"{layout}_bytes"] = nbytes / (count * local_batch)
        figures[f"{layout}_h2d_s"] = seconds / count if cuda else None
    return figures


def bench_worker(config: dict) -> dict:
    import ray.train
    from ray.train.torch import get_device

    from workloads.train.distribute import expected_state_bytes, init_distributed, measured_state_bytes
    from workloads.train.mfu import mfu, peak_tflops
    from workloads.train.trainer import Trainer

    cfg: BenchTrainConf = config["cfg"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device() if cfg.use_gpu else torch.device("cpu")
    init_distributed(device)
    local = cfg.batch_size // world
    shards = {b: ray.train.get_dataset_shard(streaming.dataset_name(b)) for b in config["batches"]}
    input_figures = transfer_figures(shards, local, device)
    stream = streaming.EpochStream(shards, config["batches"], local, seed=0, rank=rank, pin_memory=cfg.use_gpu)

    def batches():
        epoch = 0
        while True:
            for _, _, batch in stream.epoch(epoch):
                yield batch
            epoch += 1

    source = batches()
    trainer = Trainer(train_conf(cfg, cfg.stage), config["text"], device)
    for step in range(1, cfg.warmup + 1):
        trainer.step(next(source), step)
    stream_s = memory_s = wait_s = 0.0
    step = cfg.warmup + 1
    for _ in range(2):  # two rounds: streaming, then the same batches from memory
        kept: list = []
        elapsed, waiting = timed_steps(trainer, cfg.steps, step, functools.partial(_pull, source, kept))
        stream_s, wait_s, step = stream_s + elapsed, wait_s + waiting, step + cfg.steps
        elapsed, _ = timed_steps(trainer, cfg.steps, step, kept.__getitem__)
        memory_s, step = memory_s + elapsed, step + cfg.steps
    samples_per_s = 2 * cfg.steps * cfg.batch_size / stream_s
    figures = {"stream_s": stream_s, "memory_s": memory_s, "overhead": stream_s / memory_s - 1,
               "data_wait": wait_s / stream_s, "samples_per_s": samples_per_s} | input_figures
    peak = peak_tflops(device, cfg.peak_tflops)
    if peak is not None:
        figures["mfu"] = mfu(config["flops"], samples_per_s / world, peak)
    del trainer
    params = count_params(cfg.model.build())
    for stage in cfg.memory_stages:
        trainer = Trainer(train_conf(cfg, stage), config["text"], device)
        trainer.step(next(source), 1)
        measured = measured_state_bytes(trainer.module, trainer.optimizer, stage)
        param_bytes = 2 if trainer.dtype == torch.bfloat16 else 4
        per_rank = [None] * world
        dist.all_gather_object(per_rank, measured)
        figures[f"zero{stage}_bytes"] = max(per_rank)
        figures[f"zero{stage}_bytes_per_rank"] = per_rank
        figures[f"zero{stage}_expected"] = expected_state_bytes(params, world, stage, param_bytes)
        del trainer
    return figures  # rank 0's becomes Result.return_value


def report(cfg: BenchTrainConf, figures: dict, params: int) -> str:
    lines = [f"bench_train: {cfg.model.flavor} ({params:,} parameters), {cfg.num_workers} workers, global batch "
             f"{cfg.batch_size}, ZeRO-{cfg.stage}, {2 * cfg.steps} timed steps per input",
             f"  streaming input {figures['stream_s']:.3f} s, in-memory batches {figures['memory_s']:.3f} s: "
             f"overhead {figures['overhead']:+.1%} (target < 5%); data wait {figures['data_wait']:.1%} of streaming "
             f"steps; {figures['samples_per_s']:.1f} samples/s"
             + (f"; MFU {figures['mfu']:.1%}" if "mfu" in figures else "")]
    before, after = figures["all_columns_bytes"], figures["one_caption_bytes"]
    copy = figures["one_caption_h2d_s"]
    lines.append(f"  input to the device per sample: {after / 2**10:.1f} KiB with the caption chosen on the host, "
                 f"{before / 2**10:.1f} KiB with every column ({after / before:.1%} of it, target <= 55%); "
                 + (f"host-to-device {1e3 * copy:.2f} ms a batch against {1e3 * figures['all_columns_h2d_s']:.2f} ms"
                    if copy is not None else "host-to-device time: none on a CPU run"))
    for stage in cfg.memory_stages:
        got, want = figures[f"zero{stage}_bytes"], figures[f"zero{stage}_expected"]
        lines.append(f"  ZeRO-{stage}: {got / 2**20:9.2f} MiB weights+optimizer per rank, expected "
                     f"{want / 2**20:9.2f} MiB (ratio {got / want:.3f})")
    return "\n".join(lines)


def run(cfg: BenchTrainConf) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    config = cfg.model.build()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = cfg.data
        if data is None:
            text = TINY_TEXT if config.context_dim == TINY_TEXT.context_dim else SD3_TEXT
            data = write_random_dataset(tmp, cfg.rows, (config.in_channels, cfg.latent_size, cfg.latent_size), text)
        spec = read_spec(data)
        check_spec(spec, config)
        rows = {b: streaming.row_counts(spec.location, f) for b, f in spec.files_by_bucket.items()}
        batches = {b: n for b, n in streaming.batches_per_epoch(rows, cfg.num_workers,
                                                                cfg.batch_size // cfg.num_workers).items() if n}
        bucket = max(batches, key=batches.get)
        from model import train_flops

        flops = train_flops(config, *latent_shape(spec.location, spec.files_by_bucket[bucket][0])[1:],
                            spec.text.text_tokens)
        ensure_ray(min_cpus=cfg.num_workers * cfg.cpus_per_worker + 2)  # + room for Ray Data's readers
        trainer = TorchTrainer(
            bench_worker, train_loop_config={"cfg": cfg, "text": spec.text, "batches": batches, "flops": flops},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=ray.train.RunConfig(name="bench_train", storage_path=tmp),
            datasets=streaming.bucket_datasets(spec.location, {b: spec.files_by_bucket[b] for b in batches}, seed=0),
            dataset_config=streaming.ordered_ingest())
        figures = trainer.fit().return_value
    print(report(cfg, figures, count_params(config)), flush=True)
    return figures


register_train()


def main() -> None:
    cli("bench_train", run, doc=__doc__)


if __name__ == "__main__":
    main()

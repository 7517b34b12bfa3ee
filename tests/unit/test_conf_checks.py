"""Every job config refuses a nonsensical value when it is composed, before any cluster work, with a message that
names the field and what it may be; the defaults compose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import conf.evaluate  # noqa: F401  (registers `evaluate` on import)
from conf import bench, dedup, demo, pairs, preprocess, reference, reproduce, sweep, train
from workloads import runtime

ROOT = Path(__file__).resolve().parents[2]

# Each job's registered schema and the overrides it needs to compose at all.
JOBS: dict[str, list[str]] = {
    "train": ["data=/data"],
    "sweep": ["data=/data"],
    "reproduce": [],
    "reference": [],
    "demo": [],
    "evaluate": ["images=/images", "out=/out"],
    "make_pairs": ["run=/run", "out=/out", "data=/data"],
    "dedup": ["input=/in", "output=/out"],
    "preprocess": ["input=/in", "output=/out"],
    "bench_model": [],
    "bench_train": [],
    "bench_compile": [],
}


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    for register in (train.register, sweep.register, reproduce.register, reference.register, demo.register,
                     pairs.register, dedup.register, preprocess.register, bench.register, bench.register_train,
                     bench.register_compile):
        register()


# (job, override, what the one-line error must name: the field, and where the code says so, the allowed values)
BAD = [
    ("train", "optim.lr=-1", "optim.lr must be > 0"),
    ("train", "optim.lr=0", "optim.lr must be > 0"),
    ("train", "optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("train", "optim.decay_steps=-1", "optim.decay_steps must be >= 0"),
    ("train", "+trainer.worker_resources.CPU=2", "trainer.worker_resources must name custom resources"),
    ("train", "+trainer.worker_resources.spot=0", "trainer.worker_resources must name custom resources"),
    ("train", "optim.decay_steps=1001", "optim.decay_steps=1001 is more than trainer.max_steps=1000"),
    ("train", "optim.betas=[0.9,1.0]", "optim.betas must be two values in [0, 1)"),
    ("train", "optim.betas=[-0.1,0.999]", "optim.betas must be two values in [0, 1)"),
    ("train", "optim.betas=[0.9]", "optim.betas must be two values in [0, 1)"),
    ("train", "optim.eps=0", "optim.eps must be > 0"),
    ("train", "optim.eps=-1e-8", "optim.eps must be > 0"),
    ("train", "optim.weight_decay=-0.01", "optim.weight_decay must be >= 0"),
    ("train", "optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("train", "run.storage=''", "run.storage must be"),
    ("train", "run.name=''", "run.name must name a folder"),
    ("train", "run.name=/", "run.name must name a folder"),
    ("train", "trainer.max_failures=-2", "trainer.max_failures must be >= -1"),
    ("train", "trainer.max_preemptions=-2", "trainer.max_preemptions must be >= -1"),
    ("train", "validation.guidance=-1", "validation.guidance must be >= 0"),
    ("train", "validation.guidance_below=0", "validation.guidance_below must be in (0, 1]"),
    ("train", "validation.guidance_below=1.5", "validation.guidance_below must be in (0, 1]"),
    ("train", "metrics.peak_tflops=0", "metrics.peak_tflops must be > 0 (or null)"),
    ("sweep", "train.optim.lr=-1", "optim.lr must be > 0"),
    ("sweep", "max_failures=-2", "sweep.max_failures must be >= -1"),
    ("sweep", "max_concurrent_trials=0", "sweep.max_concurrent_trials must be >= 1 or null"),
    ("sweep", "training_shifts=[0,3]", "sweep.training_shifts must all be > 0"),
    ("sweep", "sampling_shifts=[-1,3]", "sweep.sampling_shifts must all be > 0"),
    ("sweep", "sampling_steps=[0,50]", "sweep.sampling_steps must all be > 0"),
    ("sweep", "geneval_guidance=-1", "sweep.geneval_guidance must be >= 0"),
    ("reproduce", "sampling_steps=[0,50]", "reproduce.sampling_steps must all be >= 1"),
    ("reproduce", "geneval_guidance=-1", "reproduce.geneval_guidance must be >= 0"),
    ("reproduce", "train.optim.betas=[1.5,0.9]", "optim.betas must be two values in [0, 1)"),
    ("reference", "latent_channels=5", "reference.latent_channels must be one of [4, 8, 16]"),
    ("reference", "train.model.in_channels=16", "reference.train.model.in_channels (16) must equal"),
    ("reference", "resolution=100", "reference.resolution must be a multiple of 8"),
    ("reference", "train.optim.lr=0", "optim.lr must be > 0"),
    ("demo", "geneval_guidance=-1", "demo.geneval_guidance must be >= 0"),
    ("demo", "geneval_prompts_per_task=0", "demo.geneval_prompts_per_task must be >= 1 (or null)"),
    ("demo", "depths=[0,2]", "demo.depths must be positive"),
    ("demo", "train.optim.eps=0", "optim.eps must be > 0"),
    ("evaluate", "guidance=-1", "evaluate.guidance must be >= 0"),
    ("evaluate", "shift=0", "evaluate.shift must be > 0"),
    ("evaluate", "guidance_below=0", "evaluate.guidance_below must be in (0, 1]"),
    ("evaluate", "prompts_per_task=0", "evaluate.prompts_per_task must be >= 1 (or null)"),
    ("make_pairs", "resolution=12", "resolution must be a positive multiple of 8"),
    ("dedup", "embedder.stage.num_cpus=0", "embedder.stage.num_cpus must be > 0"),
    ("dedup", "embedder.stage.torch_threads=0", "embedder.stage.torch_threads must be >= 1"),
    ("dedup", "embedder.stage.min_actors=0", "embedder.stage: need 1 <= min_actors <= max_actors"),
    ("dedup", "embedder.stage.num_gpus=0", "embedder.stage.num_gpus must be > 0"),
    ("preprocess", "compute.decode_num_cpus=0", "compute.decode_num_cpus must be > 0"),
    ("preprocess", "compute.decode_batch_size=0", "compute.decode_batch_size must be >= 1"),
    ("preprocess", "compute.write_batch_size=0", "compute.write_batch_size must be >= 1"),
    ("preprocess", "compute.vae.num_cpus=0", "compute.vae.num_cpus must be > 0"),
    ("preprocess", "compute.text.torch_threads=0", "compute.text.torch_threads must be >= 1"),
    ("bench_model", "batch_size=0", "bench_model.batch_size must be >= 1"),
    ("bench_model", "latent_size=0", "bench_model.latent_size must be >= 1"),
    ("bench_model", "text_tokens=0", "bench_model.text_tokens must be >= 1"),
    ("bench_model", "steps=0", "bench_model.steps must be >= 1"),
    ("bench_model", "warmup=-1", "bench_model.warmup must be >= 0"),
    ("bench_model", "device=tpu", "bench_model.device must be one of ['auto', 'cpu', 'cuda']"),
    ("bench_model", "dtype=int8", "bench_model.dtype must be one of ['auto', 'float32'"),
    ("bench_model", "peak_tflops=-1", "bench_model.peak_tflops must be > 0 (or null)"),
    ("bench_train", "rows=0", "bench_train.rows must be >= 1"),
    ("bench_train", "latent_size=0", "bench_train.latent_size must be >= 1"),
    ("bench_train", "num_workers=0", "bench_train.num_workers must be >= 1"),
    ("bench_train", "batch_size=3", "bench_train.batch_size=3 (global) must be divisible"),
    ("bench_train", "cpus_per_worker=0", "bench_train.cpus_per_worker must be > 0"),
    ("bench_train", "memory_stages=[0,5]", "ZeRO stages in [0, 1, 2, 3], got 5"),
    ("bench_train", "steps=0", "bench_train.steps must be >= 1"),
    ("bench_train", "warmup=-1", "bench_train.warmup must be >= 0"),
    ("bench_train", "peak_tflops=0", "bench_train.peak_tflops must be > 0 (or null)"),
    ("bench_compile", "batch_size=0", "bench_compile.batch_size must be >= 1"),
    ("bench_compile", "steps=0", "bench_compile.steps must be >= 1"),
    ("bench_compile", "latent_sizes=[]", "bench_compile.latent_sizes must be positive"),
    ("bench_compile", "backend=nope", "bench_compile.backend must be one of ['inductor', 'aot_eager', 'eager']"),
    ("bench_compile", "device=tpu", "bench_compile.device must be one of"),
    ("bench_compile", "dtype=fp8", "bench_compile.dtype must be one of"),
]


@pytest.mark.parametrize(("job", "override", "named"), BAD, ids=[f"{job}:{o}" for job, o, _ in BAD])
def test_a_bad_value_fails_at_compose_time_naming_the_field(job, override, named):
    with pytest.raises(Exception) as error:
        runtime.compose(job, [*JOBS[job], override])
    assert isinstance(error.value, ValueError) or isinstance(error.value.__cause__, ValueError)
    assert runtime.is_user_error(error.value)
    assert named in runtime.one_line(error.value)


@pytest.mark.parametrize("job", list(JOBS))
def test_the_defaults_compose(job):
    runtime.compose(job, JOBS[job])


@pytest.mark.parametrize(("job", "override"), [
    ("train", "optim.grad_clip=0"),  # DeepSpeed's "no clipping"
    ("train", "optim.warmup_steps=0"), ("train", "optim.betas=[0,0.99]"), ("train", "trainer.max_failures=-1"),
    ("train", "metrics.peak_tflops=989"), ("train", "run.name=sub/run"), ("sweep", "max_failures=-1"),
    ("evaluate", "prompts_per_task=null"), ("demo", "geneval_prompts_per_task=null"), ("make_pairs", "resolution=64"),
    ("bench_model", "dtype=bfloat16"), ("bench_compile", "backend=aot_eager"),
])
def test_the_edges_of_the_allowed_values_compose(job, override):
    runtime.compose(job, [*JOBS[job], override])


def test_a_config_made_in_code_is_checked_too():
    """Also the fields whose names are Hydra groups of other jobs in this process (`models`, `stage`), which an
    override here could not reach."""
    from conf.optim import OptimConf

    with pytest.raises(ValueError, match=r"optim\.lr must be > 0, got -1"):
        OptimConf(lr=-1)
    with pytest.raises(ValueError, match=r"bench_model\.models is empty"):
        bench.BenchModelConf(models=[])
    with pytest.raises(ValueError, match=r"ZeRO stages in \[0, 1, 2, 3\], got 4"):
        bench.BenchTrainConf(stage=4)


def test_the_command_line_refuses_a_negative_learning_rate_in_one_line_with_status_2():
    done = subprocess.run([sys.executable, "-m", "workloads.train", "optim.lr=-1", "data=/nonexistent"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "optim.lr" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout

"""`python -m tools.gpu.gpu_job [scale=full|tiny] [out=<folder>]`: the whole job on one GPU in one go, each
figure against a baseline measured in the same run.

1. encoder repo: random-weight VAE, CLIP-L, CLIP-G and T5 encoders written in SD3's diffusers layout (full: SD3's
   own configs, built on the GPU in fp16; tiny: the tiny models' configs), the tiny models' tokenizers beside them;
2. encoders: each one's per-sample time, loaded by `pipelines.encoders` in this process, against the paper's Table 7;
3. preprocess: `pipelines.preprocess` itself on shapes images (GPU actors in fp16, the VAE and text stages sharing the
   GPU; the input's synthetic captions, so no captioner): images/s against the same stages in a plain loop in this
   process, and each stage's share of the loop's time;
4. attention: one MM-DiT block at the paper's last resolution (1024^2, latent 128) in bf16: the SDPA kernels its
   attention runs (profiler op names), whether it runs restricted to flash, and the backends enabled;
5. network alone: forward and backward of the flavor at the job's batch and resolution, compiled as the job compiles
   (`gpu_check.time_ours_only`);
6. train: `workloads.train` itself on the preprocessed data (bf16, per-block compile, ZeRO-2, one worker): samples/s
   and MFU of the job beside the network alone's.

Each stage prints its time; gpu_job.json in `out` is rewritten after each, and a table ends the run. `scale=tiny`
runs the same code path on a CPU in a few minutes; GPU-only figures then say so.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from conf.checks import validate
from conf.model import ModelConf
from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from conf.pretrained import SD3_VAE_DOWNSAMPLE
from conf.train import (
    CheckpointConf,
    DeepSpeedConf,
    LoaderConf,
    MetricsConf,
    RunConf,
    TrainConf,
    TrainerConf,
    ValidationConf,
)
from model import count_params, get_flavor, train_flops
from model.conditioning import SD3_TEXT
from model.precision import resolve_dtype
from pipelines import schema
from tools.gpu.gpu_job_conf import BenchGPUJobConf, register_gpu_job
from tools.gpu.gpu_job_report import Job, format_table, free_device_memory, job_rows
from tools.gpu.sd3_encoders import (
    PAPER_MS,
    encoder_calls,
    paper_ratios,
    per_sample_ms,
    repo_configs,
    sd3_configs,
    write_random_repo,
)
from workloads.bench.gpu_check import time_ours_only
from workloads.runtime import cli, ensure_ray, logger, one_line
from workloads.train.distribute import expected_state_bytes
from workloads.train.mfu import mfu, peak_tflops
from workloads.train.runlog import SUMMARY, read_records

LOG = logger("gpu_job")
REPORT = "gpu_job.json"


def header(cfg: BenchGPUJobConf, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "peak_tflops": peak_tflops(device), "cpus": os.cpu_count(),
            "config": {k: v for k, v in asdict(cfg).items() if k != "defaults"}}


def write_encoders(cfg: BenchGPUJobConf, device: torch.device, work: Path) -> dict:
    from pipelines.synthetic.tiny_models import build_tiny_models

    tiny = build_tiny_models(os.path.expanduser(cfg.tiny_dir))
    configs = sd3_configs(tiny.repo) if cfg.full_size_encoders else repo_configs(tiny.repo)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repo = work / "encoders"
    tokens = SD3_TEXT.clip_tokens if cfg.full_size_encoders else None  # SD3's sequence; else the tiny tokenizers'
    params = write_random_repo(str(repo), configs, tiny.repo, device, dtype, cfg.seed, tokens)
    return {"repo": str(repo), "full_size": cfg.full_size_encoders, "dtype": dtype_name(dtype), "params": params}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encoder_dtype(device: torch.device) -> str:
    return "float16" if device.type == "cuda" else "float32"  # fp16 on a CPU is slow and not what a CPU job runs


def time_encoders(cfg: BenchGPUJobConf, repo: str, device: torch.device) -> dict:
    from pipelines.encoders import TextEncoders, VAEEncoder

    vae = VAEEncoder(repo, device=device.type, dtype=encoder_dtype(device))
    text = TextEncoders(repo, device=device.type, dtype=encoder_dtype(device))
    models = {"vae": vae.vae, "clip_l": text.clip_l, "clip_g": text.clip_g, "t5": text.t5}
    calls = encoder_calls(models, cfg.encoder_batch, cfg.resolution)
    ms = per_sample_ms(calls, cfg.encoder_batch, device, cfg.encoder_repeats)
    return {"batch": cfg.encoder_batch, "dtype": encoder_dtype(device), "ms_per_sample": ms, "paper_ms": PAPER_MS,
            "ratio_to_paper": paper_ratios(ms)}


def preprocess_conf(cfg: BenchGPUJobConf, input_uri: str, output: str, repo: str,
                    device: torch.device) -> PreprocessConf:
    """The job's config: the written repo as `models=sd3`, the input's synthetic captions, GPU actors sharing a GPU."""
    stage = StageConf(batch_size=cfg.encoder_batch, num_gpus=cfg.gpu_share)
    return PreprocessConf(input=input_uri, output=output, resolution=cfg.resolution,
                          folder_shard_size=cfg.shard_size,
                          models=ModelsConf(kind="sd3", sd3_repo=repo, synthetic_captions="input",
                                            dtype=encoder_dtype(device)),
                          compute=ComputeConf(use_gpu=device.type == "cuda", decode_batch_size=cfg.encoder_batch,
                                              write_batch_size=cfg.encoder_batch, vae=stage, text=stage))


def run_preprocess(cfg: BenchGPUJobConf, repo: str, device: torch.device, work: Path) -> dict:
    from pipelines.make_shapes import MakeShapesConf
    from pipelines.make_shapes import run as make_shapes
    from pipelines.preprocess import local_cpus, plan
    from pipelines.preprocess import run as preprocess
    from workloads.bench.preprocess import plain_loop

    shapes = work / "shapes"
    make_shapes(MakeShapesConf(out=str(shapes), n=cfg.images, seed=cfg.seed, size=cfg.resolution,
                               shard_size=cfg.shard_size, formats=["folder"]))
    base = preprocess_conf(cfg, str(shapes / "folder"), str(work / "plain"), repo, device)
    if device.type == "cuda":
        require_ray_gpu(local_cpus(base, plan(base)))
    plain_s, seconds, images = plain_loop(base, os.cpu_count() or 1, device.type)
    free_device_memory()  # the loop's models, before the job's actors load theirs
    LOG.info(f"plain loop: {images / plain_s:.1f} images/s")
    data = work / "data"
    start = time.perf_counter()
    manifest = preprocess(replace(base, output=str(data)))
    stats, wall = manifest["last_run"], time.perf_counter() - start
    # after the first shard: the actors are up and the pipeline full
    steady = (stats["rows"] - cfg.shard_size) / max(1e-9, stats["seconds"] - stats["first_shard_seconds"])
    # the shapes are never rejected: a rejected row is an encoder's failure (out of memory, a dtype), and the rate
    # would be one of rejections
    if manifest["counts"]["rejected"]:
        raise RuntimeError(f"{manifest['counts']['rejected']} rows rejected; first reasons: {first_reasons(data)}")
    free_text_encoders(Path(repo))
    return {"data": str(data), "images": stats["rows"], "rejected": manifest["counts"]["rejected"],
            "images_per_s": stats["rows"] / wall, "steady_images_per_s": steady if stats["shards"] > 1 else None,
            "plain_images_per_s": images / plain_s, "plain_shares": {k: v / plain_s for k, v in seconds.items()}}


def require_ray_gpu(min_cpus: float) -> None:
    """Start the local Ray as the preprocessing job would (`min_cpus` logical CPUs) and check it counts the GPU
    (through NVML): with none, the job's GPU actors would wait forever."""
    import ray

    ensure_ray(min_cpus=min_cpus)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError(f"torch sees a GPU but Ray does not (resources {ray.cluster_resources()}): NVML missing?")


def first_reasons(data: Path, n: int = 3) -> list[str]:
    """The first rejection reasons the preprocessing job recorded in its rejects files."""
    import pyarrow.parquet as pq

    files = sorted((data / schema.REJECTS_DIR).glob("*.parquet"))
    return [f"{stage}: {reason}" for f in files for stage, reason in
            zip(*pq.read_table(f, columns=[schema.REJECT_STAGE, schema.REJECT_REASON]).to_pydict().values(),
                strict=True)][:n]


def free_text_encoders(repo: Path) -> None:
    """The text encoders' weights (T5-XXL alone is 9.5 GB in fp16) are not needed after preprocessing; the disk
    is, for the final checkpoint. The VAE stays: the training job decodes its sample grid with it."""
    for folder in sorted(repo.glob("text_encoder*")):
        shutil.rmtree(folder, ignore_errors=True)
        LOG.info(f"removed {folder}: the text is encoded")


# SDPA's kernels as the profiler names their forward ops
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
            "aten::_scaled_dot_product_attention_math": "math"}


def attention_backends(cfg: BenchGPUJobConf, device: torch.device) -> dict:
    """One block's forward and backward at `attention_resolution` with SDPA free to choose (what did it run?), then
    restricted to flash (does it run?)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from model.mmdit import MMDiTBlock

    config = get_flavor(cfg.flavor)
    dtype = torch.bfloat16  # what training runs on a GPU; on a CPU the same dispatch is checked
    latent = cfg.attention_resolution // SD3_VAE_DOWNSAMPLE
    image_tokens = (latent // config.patch_size) ** 2
    with device:
        block = MMDiTBlock(config).to(dtype)
        img = torch.randn(1, image_tokens, config.hidden_size, dtype=dtype, requires_grad=True)
        txt = torch.randn(1, SD3_TEXT.text_tokens, config.hidden_size, dtype=dtype, requires_grad=True)
        y = torch.randn(1, config.hidden_size, dtype=dtype)

    def step() -> None:
        img_out, txt_out = block(img, txt, y)
        (img_out.float().square().mean() + txt_out.float().square().mean()).backward()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    used = sorted({SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS})
    figures = {"resolution": cfg.attention_resolution, "tokens": image_tokens + SD3_TEXT.text_tokens,
               "head_dim": config.hidden_size // config.num_heads, "dtype": dtype_name(dtype), "used": used,
               "math_fallback": "math" in used}
    if device.type != "cuda":
        LOG.info("no GPU: the flash-only run and the enabled backends are GPU checks, skipped")
        return figures | {"flash_only": "skipped: no GPU", "enabled": None}
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            step()
        torch.cuda.synchronize(device)
        flash_only = "ok"
    except RuntimeError as err:  # SDPA names why no flash kernel fits (dtype, head dim, mask, architecture)
        flash_only = f"failed: {one_line(err)}"
    b = torch.backends.cuda
    enabled = {"flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(),
               "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}
    return figures | {"flash_only": flash_only, "enabled": enabled}


def compiles(cfg: BenchGPUJobConf, device: torch.device) -> bool:
    """Whether the training job compiles with this `compile` setting on `device` (its rule, `TrainerConf.compiles`)."""
    return TrainerConf(compile=cfg.compile).compiles(device.type)


def network_alone(cfg: BenchGPUJobConf, device: torch.device) -> dict:
    dtype = resolve_dtype("auto", device, gpu_default=torch.bfloat16)  # the training job's `trainer.dtype=auto`
    latent = cfg.resolution // SD3_VAE_DOWNSAMPLE
    figures = time_ours_only(device, cfg.flavor, cfg.batch_size, latent, cfg.network_steps,
                             compile_blocks=compiles(cfg, device), dtype=dtype)
    torch._dynamo.reset()  # compiled graphs hold on to the network: let it go before the job's worker takes the GPU
    return figures | {"batch": cfg.batch_size, "latent": latent, "dtype": dtype_name(dtype),
                      "compiled": compiles(cfg, device)}


def train_conf(cfg: BenchGPUJobConf, data: str, storage: str, gpu: bool) -> TrainConf:
    """The training job at its defaults but for the sizes here: one worker, no export, validation and the checkpoint
    only at the end (both are part of the job's wall time, not of its samples/s)."""
    t = TrainConf(data=data, model=ModelConf(cfg.flavor), export=False,
                  trainer=TrainerConf(num_workers=1, use_gpu=gpu, batch_size=cfg.batch_size, max_steps=cfg.steps,
                                      max_failures=0, seed=cfg.seed, compile=cfg.compile),
                  deepspeed=DeepSpeedConf(stage=cfg.zero_stage, torch_adam=cfg.torch_adam),
                  loader=LoaderConf(val_fraction=0.05),
                  validation=ValidationConf(every=cfg.steps, samples=8, batch_size=8, grid_prompts=1,
                                            grid_per_prompt=1, sample_steps=2, text_gap=False),
                  checkpoint=CheckpointConf(every=cfg.steps, keep=1),
                  metrics=MetricsConf(print_every=max(1, cfg.steps // 5)),
                  run=RunConf(storage=storage, name=f"gpu-job-{time.strftime('%Y%m%d-%H%M%S')}"))
    validate(t)
    return t


def checkpoint_room(t: TrainConf, gpu: bool) -> dict:
    """The final checkpoint's expected size (weights, AdamW state, fp32 EMA) and the room for it: written to the
    temporary folder, then copied into the run folder by `ray.train.report`."""
    params = count_params(t.model.build())
    size = expected_state_bytes(params, 1, int(t.deepspeed.stage), 2 if gpu else 4) + 4 * params
    tmp, storage = Path(tempfile.gettempdir()), Path(t.run.storage)
    storage.mkdir(parents=True, exist_ok=True)
    same = os.stat(tmp).st_dev == os.stat(storage).st_dev
    free = {str(p): shutil.disk_usage(p).free for p in (tmp, storage)}
    fits = min(free.values()) >= (2 if same else 1) * size
    if not fits:
        LOG.warning(f"the final checkpoint (~{size / 1e9:.1f} GB, in {tmp} then copied to {storage}) would not fit: "
                    f"free {', '.join(f'{p} {b / 1e9:.1f} GB' for p, b in free.items())}")
    return {"checkpoint_gb": size / 1e9, "free_gb": {p: b / 1e9 for p, b in free.items()}, "checkpoint_fits": fits}


def job_figures(run: Path, t: TrainConf, latent: int, peak: float | None) -> dict:
    """samples/s and MFU of the job: from summary.json (the median step), or from metrics.jsonl when the run
    ended before writing it."""
    summary = json.loads((run / SUMMARY).read_text()) if (run / SUMMARY).is_file() else {}
    records = [r for r in read_records(str(run)) if "samples_per_s" in r]
    if not records:
        return {}
    rate = summary.get("samples_per_s") or statistics.median(r["samples_per_s"] for r in records)
    flops = summary.get("train_flops_per_sample") or train_flops(t.model.build(), latent, latent)
    world = t.trainer.num_workers
    return {"source": SUMMARY if summary else "metrics.jsonl", "steps": len(records), "samples_per_s": rate,
            "train_flops_per_sample": flops, "mfu": mfu(flops, rate / world, peak) if peak else None,
            "first_step_s": records[0]["step_s"], "median_step_s": statistics.median(r["step_s"] for r in records),
            "data_wait": statistics.median(r["data_wait"] for r in records),
            "loss": records[-1]["loss"], "skipped_steps": records[-1]["skipped_total"], "run": str(run)}


def run_training(cfg: BenchGPUJobConf, data: str, device: torch.device, work: Path, out: Path) -> dict:
    from workloads.train.driver import run as train

    gpu = device.type == "cuda"
    t = train_conf(cfg, data, str(work / "runs"), gpu)
    room = checkpoint_room(t, gpu)
    if not room["checkpoint_fits"]:  # a full disk under Ray can hang the job instead of failing it
        t.checkpoint.every, t.checkpoint.final = t.trainer.max_steps + 1, False
        LOG.warning("no checkpoint: it would not fit (checkpoint_fits false in the figures)")
    start, error = time.perf_counter(), None
    try:
        train(t)
    # e.g. the final checkpoint, or the time guard's SIGINT (Ray Train's driver turns it into SystemExit): the
    # steps' figures are in metrics.jsonl already
    except (Exception, KeyboardInterrupt, SystemExit) as err:
        LOG.exception("the training job failed or was stopped")
        error = f"{type(err).__name__}: {one_line(err)}" if isinstance(err, Exception) else \
            f"stopped ({type(err).__name__}: the time guard's interrupt)"
    latent = cfg.resolution // SD3_VAE_DOWNSAMPLE
    run_folder = Path(t.run.storage) / t.run.name
    keep_run_logs(run_folder, out / "train-run")
    figures = job_figures(run_folder, t, latent, peak_tflops(device))
    if error and not figures:
        raise RuntimeError(error)
    return figures | room | {"job_seconds": time.perf_counter() - start, "run_error": error, "batch": cfg.batch_size,
                             "zero_stage": int(t.deepspeed.stage), "compiled": compiles(cfg, device)}


def keep_run_logs(run: Path, into: Path) -> None:
    """The run's records (metrics, events, summary) beside the report: the work folder is removed at the end."""
    into.mkdir(parents=True, exist_ok=True)
    for path in sorted(run.glob("*.json*")):
        shutil.copy2(path, into / path.name)


def run(cfg: BenchGPUJobConf) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.work:
        Path(cfg.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-job-", dir=cfg.work))  # a new one each run: nothing resumes by accident
    out = Path(cfg.out or os.environ.get("OUT") or Path(tempfile.gettempdir()) / "gpu-job-out")
    job = Job(out / REPORT, header(cfg, device))
    LOG.info(f"{job.figures['device']}, torch {torch.__version__}, scale={cfg.scale}; work {work}, report {job.report}")
    start = time.perf_counter()
    try:
        repo = job.stage("encoder repo", lambda: write_encoders(cfg, device, work))
        if repo:
            job.stage("encoders", lambda: time_encoders(cfg, repo["repo"], device))
        data = job.stage("preprocess", lambda: run_preprocess(cfg, repo["repo"], device, work)) if repo else None
        job.stage("attention", lambda: attention_backends(cfg, device))
        job.stage("network alone", lambda: network_alone(cfg, device))
        if data:
            job.stage("train", lambda: run_training(cfg, data["data"], device, work, out))
    finally:  # also on the time guard's interrupt: what was measured is printed and kept
        job.figures["seconds"] = round(time.perf_counter() - start, 1)
        job.write()
        print(format_table(job_rows(job.figures, cfg.mfu_target)), flush=True)
        LOG.info(f"figures in {job.report}")
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
            LOG.info(f"removed {work} (keep_work=true keeps it)")
    return job.figures


register_gpu_job()


def main() -> None:
    cli("bench_gpu_job", run, doc=__doc__)


if __name__ == "__main__":
    main()

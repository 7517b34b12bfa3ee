"""Images/s of the Ray Data preprocessing job against the same stages in a plain single-process loop.

Both run in one process on the same images and models; model loading is counted in both. Prints the ratio
(Ray / plain), the plain loop's time share per stage, and the Ray job at each actor-pool size given.
Run: `python -m workloads.bench.preprocess [n=64 size=256 actors=[1,2]]`.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from hydra.core.config_store import ConfigStore

from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from pipelines.make_shapes import MakeShapesConf
from pipelines.make_shapes import run as make_shapes
from pipelines.output import write_batch
from pipelines.preprocess import plan
from pipelines.preprocess import run as preprocess
from pipelines.stages import CaptionStage, TextStage, VAEStage, decode_batch, object_column, read_rows
from workloads.runtime import cli


@dataclass
class BenchPreprocessConf:
    n: int = 64
    size: int = 256  # source image side
    resolution: int = 256
    shard_size: int = 16
    batch_size: int = 16
    actors: list[int] = field(default_factory=lambda: [1, 2])  # VAE (the heaviest stage) pool sizes to time
    num_cpus: int = 2  # logical CPUs of the local Ray cluster
    cores: int = 2  # torch threads are split between the VAE actors; the plain loop uses them all
    tiny_dir: str = "~/.cache/sd3-train/tiny-models"


def _config(cfg: BenchPreprocessConf, input_uri: str, output: str, vae_actors: int) -> PreprocessConf:
    light = StageConf(batch_size=cfg.batch_size, num_cpus=0.25)
    vae = StageConf(batch_size=cfg.batch_size, min_actors=vae_actors, max_actors=vae_actors, num_cpus=0.25,
                    torch_threads=max(1, cfg.cores // vae_actors))
    return PreprocessConf(input=input_uri, output=output, resolution=cfg.resolution,
                          folder_shard_size=cfg.shard_size,
                          models=ModelsConf(kind="tiny", tiny_dir=cfg.tiny_dir, caption_max_new_tokens=16),
                          compute=ComputeConf(decode_num_cpus=0.25, decode_batch_size=cfg.batch_size,
                                              write_batch_size=cfg.batch_size, vae=vae, caption=light, text=light))


def plain_loop(pcfg: PreprocessConf, threads: int, device: str = "cpu") -> tuple[float, dict[str, float], int]:
    """The same stages called in order in this process, one shard a batch: (seconds, seconds per stage, images)."""
    shares: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    p = plan(pcfg)
    m = pcfg.models
    synthetic = m.synthetic_captions == "input"  # the input's own synthetic captions: no captioner (`plan`)
    tick = time.perf_counter()
    stages = {"caption": CaptionStage(p.captioner, device, m.dtype, m.caption_max_new_tokens, threads)} \
        if p.captioner else {}
    stages |= {"vae": VAEStage(p.repo, device, m.dtype, threads), "text": TextStage(p.repo, device, m.dtype, threads)}
    shares["load models"] += time.perf_counter() - tick
    images = 0
    for shard in p.shards:
        tick = time.perf_counter()
        rows = read_rows({"index": shard.index, "format": shard.format, "paths": list(shard.paths),
                          "root": shard.root}, pcfg.endpoint_url, synthetic)
        batch = {k: object_column([r[k] for r in rows]) for k in rows[0]}
        shares["read"] += time.perf_counter() - tick
        tick = time.perf_counter()
        batch = decode_batch(batch, p.limits, synthetic=synthetic)
        shares["decode"] += time.perf_counter() - tick
        for name, stage in stages.items():
            tick = time.perf_counter()
            batch = stage(batch)
            shares[name] += time.perf_counter() - tick
        tick = time.perf_counter()
        write_batch(batch, pcfg.output, pcfg.endpoint_url, p.text)
        shares["write"] += time.perf_counter() - tick
        images += len(rows)
    return time.perf_counter() - start, dict(shares), images


def run(cfg: BenchPreprocessConf) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    make_shapes(MakeShapesConf(out=str(work / "shapes"), n=cfg.n, seed=0, size=cfg.size, shard_size=cfg.shard_size,
                               formats=["folder"]))
    input_uri = str(work / "shapes" / "folder")
    base = _config(cfg, input_uri, str(work / "plain"), 1)
    plan(base)  # builds the tiny models once, outside the timings
    plain_s, shares, images = plain_loop(base, cfg.cores)
    print(f"plain loop: {images} images in {plain_s:.1f} s = {images / plain_s:.2f} images/s; time share: "
          + ", ".join(f"{k} {v / plain_s:.0%}" for k, v in shares.items()), flush=True)
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
    results = {"plain_images_per_s": images / plain_s, "ray": {}}
    try:
        for actors in cfg.actors:
            pcfg = replace(base, output=str(work / f"ray-{actors}"),
                           compute=_config(cfg, input_uri, "", actors).compute)
            start = time.perf_counter()
            stats = preprocess(pcfg)["last_run"]
            rate = stats["rows"] / (time.perf_counter() - start)
            # After the first shard: the pipeline is full and the actors are up (worker start-up excluded).
            steady = (stats["rows"] - cfg.shard_size) / (stats["seconds"] - stats["first_shard_seconds"])
            results["ray"][actors] = {"images_per_s": rate, "steady_images_per_s": steady}
            plain = results["plain_images_per_s"]
            print(f"ray data, {actors} VAE actor(s): {rate:.2f} images/s (ratio ray/plain {rate / plain:.2f}); "
                  f"after the first shard {steady:.2f} images/s (ratio {steady / plain:.2f})", flush=True)
    finally:
        ray.shutdown()
    return results


ConfigStore.instance().store(name="bench_preprocess", node=BenchPreprocessConf)


def main() -> None:
    cli("bench_preprocess", run, doc=__doc__)


if __name__ == "__main__":
    main()

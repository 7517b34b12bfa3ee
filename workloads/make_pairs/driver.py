"""`python -m workloads.make_pairs run=<run> data=<its data> out=<path or s3://>`: preference pairs made automatically,
for DPO (`workloads.train objective=dpo data=<out>`).

The run's EMA weights sample `images_per_prompt` images of each training prompt (GenEval tasks, none of them in the
held-out evaluation set) as Ray Data batch inference (the evaluation job's `Generator` actor, on a GPU where the
cluster has one), each image is judged by GenEval-shapes on CPU tasks, and each prompt's correct images are paired
with its incorrect ones (no image used twice, at most `pairs_per_prompt`). The pairs are written as a preference
dataset, latents directly (no re-encoding): the training layout with the winner as `latent`, the loser as
`latent_loser` and the prompt's text embeddings (encoded once by the data's own text encoders) as both captions'.
The manifest (`kind: pairs`) counts prompts, images and pairs per task; `pairs.png` shows the first pairs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conf.pairs import MakePairsConf, register
from pipelines import geneval, schema
from pipelines.storage import Location, join
from workloads.runtime import cli, ensure_ray, logger

LOG = logger("make_pairs")


class NoPairs(ValueError):
    """No prompt had both a correct and an incorrect sample: there is nothing to prefer."""


def check(cfg: MakePairsConf):
    """Everything that can be wrong before Ray starts: the run's export, the data's manifest, the prompts. Returns
    (the data's spec, the prompts)."""
    from workloads.evaluate.prompts import training_prompts
    from workloads.train.data import read_spec
    from workloads.train.initialize import init_source

    init_source(Location.of(cfg.run, cfg.endpoint_url), "run")
    spec = read_spec(cfg.data, cfg.endpoint_url)
    if not spec.vae:
        raise ValueError(f"data={cfg.data}: its manifest names no models.sd3_repo (the text encoders and VAE)")
    sample_resolution(cfg, spec)
    out = Location.of(cfg.out, cfg.endpoint_url)
    if out.exists(schema.MANIFEST):
        raise FileExistsError(f"out={cfg.out} already holds a dataset ({schema.MANIFEST}): choose another out=")
    prompts = training_prompts(dict.fromkeys(geneval.TAGS, cfg.prompts_per_task),
                               dict.fromkeys(geneval.TAGS, cfg.held_out_prompts_per_task), cfg.prompt_seed)
    return spec, prompts


def sample_resolution(cfg: MakePairsConf, spec) -> int:
    """The square side the samples are drawn at: `resolution=`, else the data's square bucket, else its resolution."""
    if cfg.resolution:
        return cfg.resolution
    if spec.buckets:
        squares = [int(b.split("x")[0]) for b in spec.buckets if len(set(b.split("x"))) == 1]
        if not squares:
            raise ValueError(f"data={cfg.data} has no square bucket ({list(spec.buckets)}): set resolution=")
        return max(squares)
    return spec.resolution


class _Judge:
    """A Ray Data batch of samples judged by GenEval-shapes (CPU tasks): adds `correct`, drops the PNG."""

    def __init__(self, prompts: list[dict]) -> None:
        self.prompts = prompts

    def __call__(self, batch: dict) -> dict:
        from pipelines.geneval.detect import ShapesDetector
        from pipelines.geneval.scoring import score_image

        detector = ShapesDetector()
        correct = []
        for png, index in zip(batch["png"], batch["prompt_index"], strict=True):
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            correct.append(score_image(self.prompts[int(index)], detector(pixels))[0])
        return {"prompt_index": batch["prompt_index"], "k": batch["k"], "latent": batch["latent"], "png": batch["png"],
                "correct": np.array(correct, dtype=bool)}


def sample_and_judge(cfg: MakePairsConf, prompts: list[dict], models: str, resolution: int) -> list[dict]:
    """Every sample of every prompt with its latent, PNG and verdict, in (prompt, k) order."""
    import ray
    import ray.data

    from workloads.evaluate.driver import local_export
    from workloads.evaluate.generate import ALL_CORES, Generator

    ensure_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [{"prompt_index": i, "k": k, "prompt": p["prompt"]}
            for i, p in enumerate(prompts) for k in range(cfg.images_per_prompt)]
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        export = local_export(Location.of(cfg.run, cfg.endpoint_url), scratch)
        generator = {"export": export, "models": models, "resolution": resolution, "steps": cfg.steps,
                     "guidance": cfg.guidance, "shift": cfg.shift, "sampler": str(cfg.sampler), "seed": cfg.seed,
                     "slg": cfg.skip_layer_guidance,
                     "use_gpu": use_gpu, "threads": 0 if use_gpu else ALL_CORES, "keep_latents": True}
        dataset = ray.data.from_items(rows).map_batches(
            Generator, fn_constructor_kwargs=generator, batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
            batch_format="numpy")
        judged = dataset.map_batches(_Judge(prompts).__call__, batch_size=cfg.batch_size, batch_format="numpy")
        samples = judged.take_all()
    return sorted(samples, key=lambda r: (int(r["prompt_index"]), int(r["k"])))


def pair_up(samples: list[dict], per_prompt: int) -> list[tuple[dict, dict]]:
    """(winner, loser) pairs: each prompt's correct samples against its incorrect ones in k order, no sample used
    twice, at most `per_prompt` pairs a prompt."""
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        by_prompt[int(s["prompt_index"])].append(s)
    pairs = []
    for index in sorted(by_prompt):
        good = [s for s in by_prompt[index] if s["correct"]]
        bad = [s for s in by_prompt[index] if not s["correct"]]
        pairs += list(zip(good, bad, strict=False))[:per_prompt]
    return pairs


def pairs_table(pairs: list[tuple[dict, dict]], prompts: list[dict], embeddings: dict[str, np.ndarray],
                spec, resolution: int, source: str) -> pa.Table:
    """The preference rows in the training layout (`schema.data_schema(..., pairs=True)`)."""
    index = np.array([int(w["prompt_index"]) for w, _ in pairs])
    winners = np.stack([w["latent"] for w, _ in pairs])
    losers = np.stack([lo["latent"] for _, lo in pairs])
    latent_shape = tuple(winners.shape[1:])
    shapes = schema.embedding_shapes(spec.text)
    captions = [prompts[i]["prompt"] for i in index]
    columns = {
        schema.ID: [f"pair-{i:05d}-{int(w['k'])}-{int(lo['k'])}" for i, (w, lo) in zip(index, pairs, strict=True)],
        schema.SOURCE: [source] * len(pairs), schema.CAPTION: captions, schema.SYNTHETIC_CAPTION: captions,
        schema.WIDTH: [resolution] * len(pairs), schema.HEIGHT: [resolution] * len(pairs),
        schema.LATENT: schema.tensor_column(winners, latent_shape),
        schema.LOSER_LATENT: schema.tensor_column(losers, latent_shape),
    }
    for kind in schema.CAPTION_KINDS:
        for output in schema.ENCODER_OUTPUTS:
            columns[schema.embedding_column(kind, output)] = schema.tensor_column(embeddings[output][index],
                                                                                  shapes[output])
    return pa.table(columns, schema=schema.data_schema(latent_shape, spec.text, pairs=True))


def pairs_sheet(pairs: list[tuple[dict, dict]], count: int = 8) -> Image.Image | None:
    """The first pairs side by side: winner above loser, one column a pair."""
    shown = pairs[:count]
    if not shown:
        return None
    sheet = Image.new("RGB", (len(shown) * 100, 200), "white")
    for i, (w, lo) in enumerate(shown):
        for row, sample in enumerate((w, lo)):
            tile = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((96, 96))
            sheet.paste(tile, (i * 100 + 2, row * 100 + 2))
    return sheet


def run(cfg: MakePairsConf) -> dict:
    """Sample, judge, pair and write; returns the manifest."""
    spec, prompts = check(cfg)
    resolution = sample_resolution(cfg, spec)
    LOG.info(f"sampling {len(prompts)} training prompts x {cfg.images_per_prompt} images with {cfg.run} "
             f"({cfg.held_out_prompts_per_task} prompts of each task held out for evaluation)")
    samples = sample_and_judge(cfg, prompts, spec.vae, resolution)
    return write_pairs(cfg, spec, prompts, samples, resolution)


def write_pairs(cfg: MakePairsConf, spec, prompts: list[dict], samples: list[dict], resolution: int) -> dict:
    """Pair the judged samples and write the preference dataset (data file, pairs.png, then the manifest)."""
    import ray

    from workloads.evaluate.inline import encode_prompts

    pairs = pair_up(samples, cfg.pairs_per_prompt)
    tags = [p["tag"] for p in prompts]
    count = lambda items: {t: sum(1 for i in items if tags[i] == t) for t in geneval.TAGS}  # noqa: E731
    correct = [int(s["prompt_index"]) for s in samples if s["correct"]]
    stats = {"prompts": count(range(len(prompts))), "images": count([int(s["prompt_index"]) for s in samples]),
             "correct": count(correct), "pairs": count([int(w["prompt_index"]) for w, _ in pairs])}
    if not pairs:
        raise NoPairs(f"no prompt had both a correct and an incorrect sample ({sum(stats['correct'].values())} of "
                      f"{len(samples)} correct): raise images_per_prompt or sample from another run")
    out = Location.of(cfg.out, cfg.endpoint_url)
    # once per prompt, by the data's text encoders on a Ray task (a GPU where there is one: T5-XXL in production)
    task = ray.remote(encode_prompts).options(num_gpus=int(ray.cluster_resources().get("GPU", 0) >= 1))
    embeddings = ray.get(task.remote(spec.vae, [p["prompt"] for p in prompts]))
    table = pairs_table(pairs, prompts, embeddings, spec, resolution, cfg.run)
    relative = join(schema.DATA_DIR, schema.bucket_dir(resolution, resolution),
                    f"{schema.shard_prefix(0)}00000000.parquet")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    out.write_bytes(relative, buffer.getvalue())
    file = out.path(relative)  # as the preprocessing manifest lists its files: paths on the store
    sheet = pairs_sheet(pairs)
    if sheet is not None:
        image = io.BytesIO()
        sheet.save(image, format="PNG")
        out.write_bytes("pairs.png", image.getvalue())
    data_manifest = json.loads(spec.location.read_bytes(schema.MANIFEST))
    slg = cfg.skip_layer_guidance
    manifest = {"kind": schema.PAIRS_KIND, "output": out.uri, "files": [file],
                "counts": {"read": len(samples), "written": len(pairs), "rejected": 0},
                "models": data_manifest["models"], "resolution": resolution, "buckets": [f"{resolution}x{resolution}"],
                "source": {"run": cfg.run, "data": cfg.data}, **stats,
                "settings": {"images_per_prompt": cfg.images_per_prompt, "pairs_per_prompt": cfg.pairs_per_prompt,
                             "held_out_prompts_per_task": cfg.held_out_prompts_per_task,
                             "prompt_seed": cfg.prompt_seed, "steps": cfg.steps, "guidance": cfg.guidance,
                             "shift": cfg.shift, "sampler": str(cfg.sampler), "seed": cfg.seed,
                             "skip_layer_guidance": None if slg is None else dataclasses.asdict(slg)}}
    out.write_bytes(schema.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # last: the dataset is done
    per_task = ", ".join(f"{t} {n}" for t, n in stats["pairs"].items())
    LOG.info(f"{len(pairs)} pairs from {len(samples)} images ({sum(stats['correct'].values())} correct): {per_task}; "
             f"written to {cfg.out}")
    return manifest


register()


def main() -> None:
    cli("make_pairs", run, doc=__doc__)


if __name__ == "__main__":
    main()

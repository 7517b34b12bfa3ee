"""`python -m workloads.evaluate images=<folder> out=<folder>`: GenEval-shapes scores of a folder of images;
`python -m workloads.evaluate run=<run or export> data=<dataset> out=<folder>`: sample a prompt set first.

With run=, the network (the run's EMA export) samples `images_per_prompt` images of each prompt (the shapes prompt
set by default) as Ray Data batch inference (`generate`), written under `<out>/images` in GenEval's layout. The
images and their prompts are listed on the driver; detection and scoring run as Ray Data batches on CPU tasks.
Writes to `out`: `results.jsonl` (one line per image in GenEval's result layout: filename, tag, prompt, correct,
reason, metadata, and the detections), `summary.json` ({"overall", "tasks", "images", "prompts", ...}) and
`grid.png` (the first images, each with a green or red mark). With `image_metrics.clip_model` and/or
`image_metrics.fid_reference` set, the summary also has the same images' `clip_score` and `fid` (computed in the
driver process, on its GPU if it has one).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from conf.evaluate import EvaluateConf
from pipelines import geneval
from pipelines.geneval.credit import credit_line
from pipelines.geneval.detect import ShapesDetector
from pipelines.geneval.scoring import score_detections, summarize
from pipelines.storage import Location
from pipelines.synthetic.shapes import COLORS, SHAPES
from workloads.evaluate.image_metrics import IMAGE_SUFFIXES, StoredImages, image_metrics, read_image
from workloads.runtime import cli, ensure_ray, logger

LOG = logger("evaluate")


@dataclass(frozen=True)
class Item:
    """One image to score: its file, its prompt's metadata, and which prompt of the set it answers."""

    path: str
    metadata: dict
    prompt_index: int


def list_items(images: Location) -> list[Item]:
    """The images under `images` and their metadata: GenEval's layout (`<index>/metadata.jsonl`,
    `<index>/samples/*.png`) if it has one, else `<key>.<image>` with its prompt in `<key>.txt`."""
    fs, root = images.fs, images.root
    if not fs.isdir(root):
        raise FileNotFoundError(f"images={images.uri}: no such folder")
    files = sorted(fs.find(root))
    metas = [f for f in files if f.endswith("/metadata.jsonl")]
    items: list[Item] = []
    if metas:
        for index, meta_file in enumerate(metas):
            meta = json.loads(fs.cat_file(meta_file).decode().splitlines()[0])
            folder = meta_file.rsplit("/", 1)[0] + "/samples/"
            items += [Item(f, meta, index) for f in files if f.startswith(folder) and f.endswith(IMAGE_SUFFIXES)]
        return items
    captions = {f[: -len(".txt")]: f for f in files if f.endswith(".txt")}
    prompts: dict[str, int] = {}
    for f in files:
        stem, _, suffix = f.rpartition(".")
        if "." + suffix.lower() not in IMAGE_SUFFIXES or stem not in captions:
            continue
        prompt = fs.cat_file(captions[stem]).decode("utf-8").strip()
        meta = geneval.parse(prompt, SHAPES, list(COLORS))
        items.append(Item(f, meta, prompts.setdefault(prompt, len(prompts))))
    if not items:
        raise FileNotFoundError(f"images={images.uri}: no images with a <key>.txt prompt beside them, and no "
                                "GenEval layout (<index>/metadata.jsonl + <index>/samples/)")
    return items


def score_items(items: list[Item], images: Location) -> list[dict]:
    """GenEval's per-image result for each item (detect, then score, with the partial credits), in the items'
    order."""
    detector = ShapesDetector()
    return [{"filename": item.path, "tag": item.metadata["tag"], "prompt": item.metadata["prompt"],
             "prompt_index": item.prompt_index, "metadata": item.metadata,
             **score_detections(item.metadata, detector(read_image(images, item.path)))} for item in items]


class _ScoreBatch:
    """A Ray Data batch of items (as rows of JSON) scored on a CPU task."""

    def __init__(self, images: Location) -> None:
        self.images = images

    def __call__(self, batch: dict) -> dict:
        items = [Item(**json.loads(row)) for row in batch["item"]]
        return {"result": np.array([json.dumps(r) for r in score_items(items, self.images)], dtype=object)}


def score_on_ray(items: list[Item], images: Location, batch_size: int) -> list[dict]:
    import ray.data

    ensure_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    rows = [{"item": json.dumps(asdict(i))} for i in items]
    dataset = ray.data.from_items(rows).map_batches(_ScoreBatch(images).__call__, batch_size=batch_size,
                                                     batch_format="numpy")
    return [json.loads(row["result"]) for row in dataset.take_all()]


def grid(results: list[dict], images: Location, count: int) -> Image.Image | None:
    """The first `count` images side by side in rows of 8, each with a green (correct) or red bar beneath."""
    shown = results[:count]
    if not shown:
        return None
    tiles = []
    for r in shown:
        with images.fs.open(r["filename"], "rb") as f:
            tile = Image.open(io.BytesIO(f.read())).convert("RGB").resize((96, 96))
        canvas = Image.new("RGB", (100, 108), "white")
        canvas.paste(tile, (2, 2))
        canvas.paste(Image.new("RGB", (96, 6), (40, 170, 60) if r["correct"] else (210, 40, 40)), (2, 100))
        tiles.append(canvas)
    cols = min(8, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * 100, rows * 108), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * 100, (i // cols) * 108))
    return sheet


def write_report(results: list[dict], out: Location, sheet: Image.Image | None,
                 metrics: dict[str, float] | None = None) -> dict:
    """Write results.jsonl, summary.json (GenEval's summary and the image `metrics`) and grid.png."""
    summary = summarize(results) | (metrics or {})
    out.write_bytes("results.jsonl", "".join(json.dumps(r) + "\n" for r in results).encode())
    out.write_bytes("summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    if sheet is not None:
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        out.write_bytes("grid.png", buffer.getvalue())
    return summary


def models_of(cfg: EvaluateConf) -> str:
    """The SD3-layout folder of the text encoders and VAE: `models=`, or the one the dataset manifest names."""
    if cfg.models is not None:
        return cfg.models
    from workloads.train.data import read_spec

    repo = read_spec(cfg.data, cfg.endpoint_url).vae  # the manifest's models.sd3_repo
    if not repo:
        raise ValueError(f"data={cfg.data}: its manifest names no models.sd3_repo; pass models=")
    return repo


def local_export(run: Location, scratch: str) -> str:
    """A local folder with the diffusers transformer: `<run>/export` or `run` itself, copied from object storage."""
    from workloads.train.initialize import init_source

    source = init_source(run, "run")
    if not source.remote:
        return source.root
    source.fs.get(source.root + "/", scratch + "/", recursive=True)
    return scratch


def sample_prompts(cfg: EvaluateConf, out: Location) -> Location:
    """Sample the prompt set with the run's network; returns where the images are (GenEval's layout)."""
    import tempfile

    from workloads.evaluate.generate import generate
    from workloads.evaluate.prompts import prompt_set, read_jsonl

    per_task = None if cfg.prompts_per_task is None else dict.fromkeys(geneval.TAGS, cfg.prompts_per_task)
    prompts = read_jsonl(cfg.prompts) if cfg.prompts else prompt_set(cfg.prompt_seed, per_task)
    models = models_of(cfg)
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        export = local_export(Location.of(cfg.run, cfg.endpoint_url), scratch)
        LOG.info(f"sampling {len(prompts)} prompts x {cfg.images_per_prompt} images with {cfg.run}")
        return generate(prompts, cfg.images_per_prompt, out, cfg.batch_size, export=export, models=models,
                        resolution=cfg.resolution, steps=cfg.steps, guidance=cfg.guidance, shift=cfg.shift,
                        sampler=str(cfg.sampler), seed=cfg.seed, slg=cfg.skip_layer_guidance,
                        guidance_below=cfg.guidance_below)


def real_image_metrics(cfg: EvaluateConf, items: list[Item], images: Location) -> dict[str, float]:
    """The CLIP score and FID of the items' images that `cfg.image_metrics` turns on ({} when it turns on none)."""
    if not cfg.image_metrics.enabled:
        return {}
    pixels = StoredImages(images, [i.path for i in items])
    metrics = image_metrics(cfg.image_metrics, pixels, [i.metadata["prompt"] for i in items], cfg.endpoint_url)
    LOG.info(", ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
    return metrics


def run(cfg: EvaluateConf) -> dict:
    """Score the folder (sampled first with run=); returns the summary."""
    out = Location.of(cfg.out, cfg.endpoint_url)
    images = sample_prompts(cfg, out) if cfg.run else Location.of(cfg.images, cfg.endpoint_url)
    items = list_items(images)
    LOG.info(f"{len(items)} images of {len({i.prompt_index for i in items})} prompts in {images.uri}")
    results = score_on_ray(items, images, cfg.batch_size)
    metrics = real_image_metrics(cfg, items, images)
    summary = write_report(results, out, grid(results, images, cfg.grid_images), metrics)
    tasks = ", ".join(f"{t} {v:.3f}" for t, v in summary["tasks"].items())
    LOG.info(f"GenEval-shapes overall {summary['overall']:.3f} ({tasks}); report in {cfg.out}")
    LOG.info(f"partial credit: {credit_line(summary)}")
    return summary


def main() -> None:
    cli("evaluate", run, doc=__doc__)


if __name__ == "__main__":
    main()

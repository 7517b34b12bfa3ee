"""Ray Data stages of the preprocessing job. Each works on numpy batches (dict of column arrays); rows already
rejected pass through untouched, so every input row reaches the writer exactly once.

Columns between stages: id, source, shard, row, shard_rows (rows the shard produced, for completion
tracking), then caption, pixels (H, W, 3 uint8), width, height, stage/reason (empty when the row is fine),
caption_synthetic, latent, and the embedding columns of `pipelines.schema`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from pipelines import schema
from pipelines.decode import DecodeLimits, Rejected, decode_image, normalise_caption
from pipelines.encoders import Captioner, TextEncoders, VAEEncoder
from pipelines.sources import PARQUET_SYNTHETIC_COLUMN, SYNTHETIC_SUFFIX, Shard, read_shard
from pipelines.torchscript import load_torchscript

if TYPE_CHECKING:
    from conf.preprocess import ScoreFilterConf

Batch = dict[str, np.ndarray]
EMPTY_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)
NO_SYNTHETIC_CAPTION = (f"no synthetic caption in the input, which models.synthetic_captions=input needs (a "
                        f"<key>{SYNTHETIC_SUFFIX} file or tar member, or a Parquet column {PARQUET_SYNTHETIC_COLUMN})")


def object_column(values: list) -> np.ndarray:
    """A 1-D object array (numpy would otherwise stack equal-shape arrays into one block)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def read_rows(item: dict, endpoint_url: str | None, synthetic: bool = False) -> list[dict]:
    """One shard -> its records as rows (with `synthetic`, their synthetic captions read from the input too). An
    unreadable shard becomes one rejected row; an empty one a placeholder (shard_rows=0) so the shard still completes;
    a known duplicate (the item's `duplicates`, JSON of row -> reason: ids need not be unique, a.png and a.jpg are both
    `a`) a reject of stage 'dedup'."""
    shard = Shard(item["index"], item["format"], tuple(item["paths"]), item["root"])
    # Missing values travel as empty bytes plus a flag: a block whose values are all None would otherwise be
    # typed null by Arrow and reach the next stage as NaN.
    base = {"shard": shard.index, "image": b"", "has_image": False, "caption_raw": b"", "has_caption": False,
            "synthetic_raw": b"", "has_synthetic": False, "loser": b"", "has_loser": False, "tie": False,
            "stage": "", "reason": ""}
    try:
        records = read_shard(shard, endpoint_url, synthetic)
    except Exception as err:
        return [{**base, "id": shard.paths[0], "source": shard.paths[0], "row": 0, "shard_rows": 1,
                 "stage": "read", "reason": f"cannot read shard: {type(err).__name__}: {err}"}]
    if not records:
        return [{**base, "id": "", "source": "", "row": -1, "shard_rows": 0}]
    duplicates = json.loads(item.get("duplicates") or "{}")  # row -> reason, from a `pipelines.dedup` output
    return [{**base, "id": r.id, "source": r.source, "row": i, "shard_rows": len(records),
             "image": r.image or b"", "has_image": r.image is not None,
             "caption_raw": r.caption or b"", "has_caption": r.caption is not None,
             "synthetic_raw": r.synthetic or b"", "has_synthetic": r.synthetic is not None,
             "loser": r.loser or b"", "has_loser": r.loser is not None, "tie": r.tie,
             **({"stage": schema.DEDUP_STAGE, "reason": duplicates[str(i)]} if str(i) in duplicates else {})}
            for i, r in enumerate(records)]


def decode_batch(batch: Batch, limits: DecodeLimits, pairs: bool = False, synthetic: bool = False) -> Batch:
    """Decode and resize images, normalise captions; any failure becomes a reject of stage 'decode'. With `pairs`
    the loser too (`pixels_loser`), at the winner's bucket; a tie is rejected. With `synthetic` the input's synthetic
    caption too (`caption_synthetic`, normalised like the caption); a row without one is rejected."""
    pixels, widths, heights, captions, synthetics, losers = [], [], [], [], [], []
    stages, reasons = list(batch["stage"]), list(batch["reason"])
    for i in range(len(batch["id"])):
        array, caption, synthetic_caption, loser = EMPTY_PIXELS, "", "", EMPTY_PIXELS
        if not stages[i] and batch["row"][i] >= 0:
            try:
                caption = normalise_caption(_raw(batch, "caption", i), limits.max_caption_chars)
                if synthetic:
                    synthetic_caption = input_synthetic_caption(batch, i, limits)
                array = decode_image(bytes(batch["image"][i]) if batch["has_image"][i] else None, limits)
                if pairs:
                    loser = decode_pair_loser(batch, i, array, limits)
            except Rejected as err:
                stages[i], reasons[i] = "decode", str(err)
            except Exception as err:  # one bad sample must never stop the job
                stages[i], reasons[i] = "decode", f"unexpected {type(err).__name__}: {err}"
        captions.append(caption)
        synthetics.append(synthetic_caption)
        pixels.append(array)
        losers.append(loser)
        widths.append(array.shape[1])
        heights.append(array.shape[0])
    read = ("image", "has_image", "caption_raw", "has_caption", "synthetic_raw", "has_synthetic", "loser",
            "has_loser", "tie")
    out = {k: v for k, v in batch.items() if k not in read}
    out.update(caption=np.array(captions, dtype=object), pixels=object_column(pixels),
               width=np.array(widths, dtype=np.int32), height=np.array(heights, dtype=np.int32),
               stage=np.array(stages, dtype=object), reason=np.array(reasons, dtype=object))
    if synthetic:
        out["caption_synthetic"] = np.array(synthetics, dtype=object)
    if pairs:
        out["pixels_loser"] = object_column(losers)
    return out


def _raw(batch: Batch, name: str, i: int) -> bytes | None:
    """Row i's `<name>_raw` bytes, or None where the input had none."""
    return bytes(batch[f"{name}_raw"][i]) if batch[f"has_{name}"][i] else None


def input_synthetic_caption(batch: Batch, i: int, limits: DecodeLimits) -> str:
    """Row i's synthetic caption from the input, normalised; raises Rejected when it is missing or blank (an empty
    synthetic caption would train as the empty prompt)."""
    text = normalise_caption(_raw(batch, "synthetic", i), limits.max_caption_chars)
    if not text:
        raise Rejected(NO_SYNTHETIC_CAPTION)
    return text


def decode_pair_loser(batch: Batch, i: int, winner: np.ndarray, limits: DecodeLimits) -> np.ndarray:
    """The loser of row i's pair, decoded; raises Rejected for a tie or a loser that lands in another bucket."""
    if batch["tie"][i]:
        raise Rejected("a tie (label_0 = 0.5): no preference to learn")
    loser = decode_image(bytes(batch["loser"][i]) if batch["has_loser"][i] else None, limits)
    if loser.shape != winner.shape:
        raise Rejected(f"winner and loser land in different buckets ({winner.shape[1]}x{winner.shape[0]} and "
                       f"{loser.shape[1]}x{loser.shape[0]})")
    return loser


def copy_caption(batch: Batch) -> Batch:
    """A pair's synthetic caption is its caption: the images were judged against the prompt (no captioner)."""
    batch["caption_synthetic"] = np.array([str(c) for c in batch["caption"]], dtype=object)
    return batch


def _live(batch: Batch) -> list[int]:
    """Indices of rows still in play (not rejected, not a placeholder). Makes the reject columns object arrays,
    so a stage can write reasons longer than Ray's fixed-width string arrays hold."""
    batch["stage"], batch["reason"] = batch["stage"].astype(object), batch["reason"].astype(object)
    return [i for i, s in enumerate(batch["stage"]) if not s and batch["row"][i] >= 0]


def _reject(batch: Batch, rows: list[int], stage: str, err: Exception) -> None:
    for i in rows:
        batch["stage"][i], batch["reason"][i] = stage, f"{type(err).__name__}: {err}"


def out_of_bounds(name: str, score: float, f: ScoreFilterConf) -> str:
    """Why `score` fails filter `name`, or '' when it passes."""
    if f.min_score is not None and not score >= f.min_score:  # NaN fails too
        return f"{name} {score:.3f} < min_score {f.min_score:g}"
    if f.max_score is not None and not score <= f.max_score:
        return f"{name} {score:.3f} > max_score {f.max_score:g}"
    return ""


class ScoreStage:
    """The score filters (`conf.preprocess.FiltersConf`): each model scores the decoded images; an image outside a
    filter's bounds is a reject of stage 'filter' naming the score; every row gets `score_<name>` (NaN if unscored)."""

    def __init__(self, filters: dict[str, ScoreFilterConf], device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.filters, self.device = filters, torch.device(device)
        self.models = {name: load_torchscript(f.model, f"filters.{name}.model", "a per-image score model",
                                              self.device) for name, f in filters.items()}
        for name, f in filters.items():  # a model of the wrong interface fails the job here, not every row
            self.score(name, [np.zeros((f.size, f.size, 3), dtype=np.uint8)])

    @torch.inference_mode()
    def score(self, name: str, images: list[np.ndarray]) -> np.ndarray:
        size = self.filters[name].size
        x = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])
        x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S)
        y = self.models[name](x).float().reshape(len(images), -1)
        if y.shape[1] != 1:
            raise ValueError(f"filters.{name}.model returned {y.shape[1]} values per image; expected one score")
        return y[:, 0].cpu().numpy()

    def __call__(self, batch: Batch) -> Batch:
        live = _live(batch)
        for name, f in self.filters.items():
            scores = np.full(len(batch["id"]), np.nan, dtype=np.float32)
            if live:
                try:
                    scores[live] = self.score(name, [batch["pixels"][i] for i in live])
                except Exception as err:
                    _reject(batch, live, "filter", err)
            for i in live:
                reason = "" if batch["stage"][i] else out_of_bounds(name, float(scores[i]), f)
                if reason:
                    batch["stage"][i], batch["reason"][i] = "filter", reason
            batch[schema.SCORE_PREFIX + name] = scores
            live = [i for i in live if not batch["stage"][i]]
        return batch


class CaptionStage:
    """Synthetic captions from the image-to-text model (loaded once per actor)."""

    def __init__(self, path: str, device: str, dtype: str, max_new_tokens: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = Captioner(path, device=device, dtype=dtype, max_new_tokens=max_new_tokens)

    def __call__(self, batch: Batch) -> Batch:
        synthetic = [""] * len(batch["id"])
        live = _live(batch)
        if live:
            try:
                for i, text in zip(live, self.model.caption([batch["pixels"][i] for i in live]), strict=True):
                    synthetic[i] = text
            except Exception as err:  # a model failure rejects this batch's rows, not the job
                _reject(batch, live, "caption", err)
        batch["caption_synthetic"] = np.array(synthetic, dtype=object)
        return batch


class VAEStage:
    """Normalised VAE latents (fp16)."""

    def __init__(self, repo: str, device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = VAEEncoder(repo, device=device, dtype=dtype)

    def __call__(self, batch: Batch) -> Batch:
        live = _live(batch)
        for pixels, column in (("pixels", schema.LATENT), ("pixels_loser", schema.LOSER_LATENT)):
            if pixels not in batch:
                continue
            latents = [np.zeros((0, 0, 0), dtype=np.float16)] * len(batch["id"])
            if live:
                try:
                    for i, latent in zip(live, self.model.encode([batch[pixels][i] for i in live]), strict=True):
                        latents[i] = latent
                except Exception as err:
                    _reject(batch, live, "vae", err)
            batch[column] = object_column(latents)
            del batch[pixels]  # not needed downstream; keeps blocks small
        return batch


class TextStage:
    """CLIP-L, CLIP-G and T5 embeddings of the original and the synthetic caption (fp16)."""

    def __init__(self, repo: str, device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = TextEncoders(repo, device=device, dtype=dtype)
        self.shapes = schema.embedding_shapes(self.model.dims)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        out = {schema.embedding_column(k, o): np.zeros((n, *self.shapes[o]), dtype=np.float16)
               for k in schema.CAPTION_KINDS for o in schema.ENCODER_OUTPUTS}
        live = _live(batch)
        if live:
            try:
                for kind, column in (("original", "caption"), ("synthetic", "caption_synthetic")):
                    encoded = self.model.encode([str(batch[column][i]) for i in live])
                    for output, values in encoded.items():
                        out[schema.embedding_column(kind, output)][live] = values
            except Exception as err:
                _reject(batch, live, "text", err)
        batch.update(out)
        return batch

"""A shapes image folder with planted near-duplicates, to measure deduplication against a known truth.

`n` distinct shapes samples (`<key>.png` + `.txt`), and for the first `planted` of them one copy of each kind in
`KINDS` as `copies/<key>-<kind>`, which sorts after every original (the kept item is the earliest in input order).
`planted.json` maps every copy to its original and kind.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from PIL import Image, ImageOps

from pipelines.storage import Location
from pipelines.synthetic.shapes import make_sample

TRUTH, COPIES = "planted.json", "copies"


def _jpeg(image: Image.Image) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue(), "jpg"


def _png(image: Image.Image) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _crop(image: Image.Image, fraction: float = 0.04) -> Image.Image:
    """A crop of `fraction` of the side from each edge (8% of each side in all)."""
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


KINDS: dict[str, Callable[[Image.Image], tuple[bytes, str]]] = {
    "exact": _png,
    "jpeg": _jpeg,  # re-encoded at quality 70
    "crop": lambda im: _png(_crop(im)),
    "resize": lambda im: _png(im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BICUBIC)),
    "flip": lambda im: _png(ImageOps.mirror(im)),
}


def write_planted(out: Location | str, n: int, planted: int, seed: int = 0, size: int = 96) -> dict[str, dict]:
    """Write the folder; returns the truth: copy id -> {original, kind}."""
    where = Location.of(out)
    truth: dict[str, dict] = {}
    files: dict[str, bytes] = {}
    for i in range(n):
        sample = make_sample(seed, i, size)
        files[f"{sample.key}.png"], _ = _png(sample.image)
        files[f"{sample.key}.txt"] = sample.caption.encode()
        for kind, make in KINDS.items() if i < planted else ():
            data, ext = make(sample.image)
            files[f"{COPIES}/{sample.key}-{kind}.{ext}"] = data
            files[f"{COPIES}/{sample.key}-{kind}.txt"] = sample.caption.encode()
            truth[f"{COPIES}/{sample.key}-{kind}"] = {"original": sample.key, "kind": kind}
    where.fs.makedirs(where.path(COPIES), exist_ok=True)
    where.fs.pipe({where.path(name): data for name, data in files.items()})
    where.write_bytes(TRUTH, json.dumps(truth, indent=1).encode())
    return truth


def score(truth: dict[str, dict], duplicates: list[dict], originals: int) -> dict:
    """Precision and recall of the items marked duplicates (rows of `schema.DUPLICATES_SCHEMA`) against the planted
    copies; `attributed` is the share of found copies marked a duplicate of their own original or of another copy of
    it (not of a look-alike); `false_duplicate_rate` the share of the `originals` distinct images marked at all."""
    found = {d["id"]: d["duplicate_of"] for d in duplicates}
    hits = [c for c in truth if c in found]
    group = {copy: t["original"] for copy, t in truth.items()}
    attributed = [c for c in hits if group.get(found[c], found[c]) == group[c]]
    by_kind = {kind: [c for c, t in truth.items() if t["kind"] == kind] for kind in KINDS}
    return {
        "precision": len(hits) / len(found) if found else 1.0,
        "recall": len(hits) / len(truth) if truth else 1.0,
        "recall_by_kind": {kind: sum(c in found for c in copies) / len(copies) for kind, copies in by_kind.items()
                           if copies},
        "attributed": len(attributed) / len(hits) if hits else 1.0,
        "false_duplicate_rate": sum(i not in group for i in found) / originals,
        "found": len(found), "planted": len(truth),
    }

"""The sampling error of GenEval-shapes scores: of one score (a share of correct images), and of the change between
two scorings of the same prompts and noise (before and after a fine-tune), where each image is paired with itself."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

# a run summary's paired-change fields (`workloads.train` with validation.geneval_before)
PAIRED = ("geneval_change_se", "geneval_gained", "geneval_lost")


def geneval_se(score: float, images: int) -> float:
    """Standard error of a GenEval overall score read as a share of `images` correct images (add-one smoothed, so
    a score of 0 or 1 still has an error)."""
    p = (score * images + 1) / (images + 2)
    return math.sqrt(p * (1 - p) / images)


@dataclass(frozen=True)
class PairedChange:
    """`after - before` of the overall score (the mean over tasks, as `scoring.summarize`), its standard error from
    the per-image differences, and how many images turned correct (`gained`) or incorrect (`lost`)."""

    before: float
    after: float
    se: float
    images: int
    gained: int
    lost: int

    @property
    def change(self) -> float:
        return self.after - self.before

    def beyond(self, z: float = 2.0) -> bool:
        """Whether the change is larger than `z` standard errors."""
        return abs(self.change) > z * self.se

    def summary_fields(self) -> dict:
        """The fields a run summary keeps (beside its geneval_before / geneval_after), named by `PAIRED`."""
        return dict(zip(PAIRED, (self.se, self.gained, self.lost), strict=True))

    @classmethod
    def of_summary(cls, summary: dict, images: int) -> PairedChange | None:
        """The change a run summary holds (None from a run that kept no per-image results)."""
        if any(summary.get(k) is None for k in PAIRED):
            return None
        se, gained, lost = (summary[k] for k in PAIRED)
        return cls(summary["geneval_before"], summary["geneval_after"], se, images, gained, lost)

    def line(self) -> str:
        """The change in words, for reports."""
        return (f"change {self.change:+.3f}, paired standard error {self.se:.3f} ({self.images} images, each scored "
                f"before and after with the same prompt and noise: {self.gained} turned correct, {self.lost} "
                f"incorrect): {'beyond' if self.beyond() else 'within'} twice its standard error")


def _key(row: dict) -> tuple:
    return row["tag"], row.get("prompt_index", row.get("prompt")), row["k"]


def paired_change(before: Sequence[dict], after: Sequence[dict]) -> PairedChange:
    """The change between two per-image GenEval results (`{"tag", "prompt_index" or "prompt", "k", "correct"}` rows)
    of the same images: each task's mean per-image difference and its variance, combined as the overall score
    combines the tasks. Results of different prompts or samples are a ValueError."""
    a = {_key(r): bool(r["correct"]) for r in before}
    b = {_key(r): bool(r["correct"]) for r in after}
    if a.keys() != b.keys() or len(a) != len(before) or len(b) != len(after):
        raise ValueError(f"the two GenEval results do not score the same images ({len(before)} and {len(after)} rows, "
                         f"{len(a.keys() & b.keys())} (task, prompt, sample) keys in common): no paired change")
    if not a:
        raise ValueError("no GenEval results to compare")
    by_task: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key in a:
        by_task[key[0]].append((int(a[key]), int(b[key])))
    means, variances = {}, {}
    for tag, pairs in by_task.items():
        n = len(pairs)
        diffs = [y - x for x, y in pairs]
        mean = sum(diffs) / n
        means[tag] = (sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n)
        variances[tag] = sum((d - mean) ** 2 for d in diffs) / (n - 1) / n if n > 1 else 0.0
    tasks = len(by_task)
    return PairedChange(before=sum(m[0] for m in means.values()) / tasks,
                        after=sum(m[1] for m in means.values()) / tasks,
                        se=math.sqrt(sum(variances.values())) / tasks, images=len(a),
                        gained=sum(1 for k in a if b[k] and not a[k]), lost=sum(1 for k in a if a[k] and not b[k]))

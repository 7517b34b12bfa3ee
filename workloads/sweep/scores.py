"""GenEval-shapes scores of a finished run, kept in the run's folder under the sampling settings that made them, so
the studies that score one run at the same setting sample it once: the depth, formulation, caption, steps and shift
studies all score the study-depth run at its training shift and the sweep's sampling steps."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from model.sampling import SkipLayerGuidance
from pipelines.storage import Location


@dataclass(frozen=True)
class GenEvalSetting:
    """Everything besides the run's weights that decides a GenEval-shapes score."""

    steps: int
    shift: float
    guidance: float
    prompts_per_task: int
    images_per_prompt: int
    seed: int
    sampler: str = "euler"
    slg: SkipLayerGuidance | None = None
    guidance_below: float = 1.0

    def key(self) -> dict:
        """What the score's file name hashes. Scores stored before the sampler and skip-layer guidance joined the
        key were all Euler without it: such a setting leaves them out, so it finds those files again."""
        key = dataclasses.asdict(self)
        if self.sampler == "euler":
            del key["sampler"]
        if self.slg is None:
            del key["slg"]
        if self.guidance_below == 1.0:  # guidance at every step, as every score before the interval joined
            del key["guidance_below"]
        return key

    def path(self) -> str:
        text = json.dumps(self.key(), sort_keys=True)
        return f"scores/geneval-{hashlib.sha1(text.encode()).hexdigest()[:12]}.json"


def read(run: Location, setting: GenEvalSetting) -> dict | None:
    """The stored summary ({"overall", "tasks"}, and "credit" and "chance" when scored since they joined) of the run
    at `setting`, or None when it was never scored."""
    run = run.refreshed()
    if not run.exists(setting.path()):
        return None
    return json.loads(run.read_bytes(setting.path()))["summary"]


def write(run: Location, setting: GenEvalSetting, summary: dict) -> None:
    kept = ("overall", "tasks", "credit", "chance")  # the scores, partial credits and their chance levels
    record = {"setting": dataclasses.asdict(setting), "summary": {k: summary[k] for k in kept if k in summary}}
    run.write_bytes(setting.path(), json.dumps(record, indent=1).encode())

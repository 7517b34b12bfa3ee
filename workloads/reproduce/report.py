"""`<out_dir>/report.md`: the verdicts first, then each finding's tables beside the paper's figures, with plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from conf.reproduce import ReproduceConf
from pipelines.storage import Location
from workloads.reproduce.findings import Section


def summary_table(sections: list[Section]) -> list[str]:
    lines = ["| finding | claim | paper | ours | verdict |", "| --- | --- | --- | --- | --- |"]
    for s in sections:
        lines += [f"| {s.finding.value} | {v.claim} | {v.paper} | {v.ours} | **{v.status}**: {v.reason} |"
                  for v in s.verdicts]
    return lines


def write(out: Path, cfg: ReproduceConf, storage: str, sections: list[Section], timings: dict[str, float],
          total_s: float) -> str:
    """Writes report.md, verdicts.json and the plots into `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.train.trainer
    at_a_time = (f"{cfg.concurrent_trials} trial(s) of a study at a time" if cfg.concurrent_trials
                 else "as many trials at a time as the cluster holds")
    lines = [f"# The paper in miniature ({cfg.preset} preset)", "",
             f"{cfg.images} shapes images, studies at {cfg.resolution} px ({cfg.high_resolution} px too, for the "
             "shift); "
             f"every run {t.max_steps} steps of batch {t.batch_size} on {t.num_workers} worker(s), width 64 x depth, "
             f"{at_a_time}; "
             f"GenEval-shapes over {cfg.geneval_prompts_per_task} prompts per task x {cfg.geneval_images_per_prompt} "
             f"image(s), {cfg.geneval_steps} Euler steps, guidance {cfg.geneval_guidance:g}. Data, runs and studies "
             f"under `{storage}`. {total_s / 60:.1f} minutes this invocation "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", "",
             "## Verdicts", "", *summary_table(sections), ""]
    for i, s in enumerate(sections, 1):
        lines += [f"## {i}. {s.title}", "", s.body, ""]
        for name, png in s.plots.items():
            (out / name).write_bytes(png)
            lines += [f"![{name}]({name})", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    verdicts = [{"finding": s.finding.value, **asdict(v)} for s in sections for v in s.verdicts]
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    return text


def publish(out: Path, to: Location) -> None:
    """Copies the report folder's files (report.md, verdicts.json, the plots) to `to`: a job on a cluster writes
    `out_dir` on a head node that goes away, so its report is also kept beside the data and runs it describes."""
    for file in sorted(out.iterdir()):
        if file.is_file():
            to.write_bytes(file.name, file.read_bytes())

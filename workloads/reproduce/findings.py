"""Each finding's analysis: the reproduction's table beside the paper's figures, and a verdict per claim
(reproduced / not reproduced / inconclusive, with the reason) decided by a stated test, never by eye."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from conf.reproduce import DPOBase, Finding, ReproduceConf
from conf.sweep import SweepConf
from model.formulations import paper_global_rank
from pipelines import geneval
from pipelines.geneval.stats import PairedChange, geneval_se
from workloads.reproduce import paper
from workloads.reproduce.stats import differs, spearman_test
from workloads.sweep import studies
from workloads.sweep.scaling import fit_power_law

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
ALPHA = 0.05  # one-sided significance of the rank-correlation claims
R2_POWER_LAW = 0.9  # the fit quality the power-law claim asks for
RULE_TOLERANCE = 1.5  # the measured ratio of best shifts may be this factor off sqrt(m/n)
LFD_RESOLVES = 0.01  # a deterministic metric, but a relative spread below this over the shifts picks no shift


@dataclass
class Verdict:
    claim: str
    paper: str
    ours: str
    status: str
    reason: str


@dataclass
class Section:
    finding: Finding
    title: str
    body: str  # Markdown
    verdicts: list[Verdict]
    plots: dict[str, bytes] = field(default_factory=dict)


def correlation_verdict(rho: float, p: float, agree: str, points: int) -> tuple[str, str]:
    """The verdict on a claim that a rank correlation is positive (callers flip the sign of a negative claim)."""
    if math.isnan(rho):
        return INCONCLUSIVE, f"{points} points, or a constant ranking: nothing to correlate"
    if rho > 0 and p < ALPHA:
        return REPRODUCED, f"{agree}: rho {rho:+.3f}, permutation p {p:.3f} < {ALPHA}"
    if rho <= 0:
        return NOT_REPRODUCED, f"rho {rho:+.3f}: the ranking runs against the paper's (p {p:.3f})"
    return INCONCLUSIVE, (f"rho {rho:+.3f} agrees in sign but p {p:.3f} >= {ALPHA}: {points} points do not "
                          "separate it from chance")


def images_per_trial(cfg: ReproduceConf, images_per_prompt: int | None = None) -> int:
    """GenEval-shapes images behind one score: every task's prompts, `images_per_prompt` (the studies' by default)
    images each."""
    per_prompt = cfg.geneval_images_per_prompt if images_per_prompt is None else images_per_prompt
    return len(geneval.TAGS) * cfg.geneval_prompts_per_task * per_prompt


def formulation(cfg: ReproduceConf, results: pd.DataFrame, sweep: SweepConf) -> Section:
    t = results.copy()
    t["loss_rank"] = t["val_loss"].rank(method="min")
    t["geneval_rank"] = t["geneval"].rank(ascending=False, method="min")
    t["combined_rank"] = ((t["loss_rank"] + t["geneval_rank"]) / 2).rank(method="min")
    t["paper_global_rank"] = [paper_global_rank(f) for f in t["formulation"]]
    t = t.sort_values(["combined_rank", "loss_rank"])[["formulation", "val_loss", "loss_rank", "geneval",
                                                      "geneval_rank", "combined_rank", "paper_global_rank"]]
    known = t.dropna(subset=["paper_global_rank"])
    lines, verdicts = [studies.markdown_table(t.reset_index(drop=True)), ""], []
    for column, by in (("loss_rank", "validation loss"), ("geneval_rank", "GenEval-shapes"),
                       ("combined_rank", "both (the mean of the two ranks, as the paper's global rank averages "
                                         "its metrics)")):
        rho, p = spearman_test(known[column], known["paper_global_rank"])
        lines.append(f"- ranked by {by}: Spearman correlation with Table 1's global ranks over {len(known)} "
                     f"formulations: {rho:.3f} (permutation p {p:.3f})")
        if column == "combined_rank":
            status, reason = correlation_verdict(rho, p, "the ranking follows the paper's", len(known))
            verdicts.append(Verdict("formulations rank as in Table 1", "rf/lognorm(0.00,1.00) first (1.54); "
                                    "edm(-1.20,1.20) last (15.58) of these", f"Spearman {rho:.3f}", status, reason))
    lines.append(f"- all at equal training compute (depth {sweep.study_depth}, {cfg.train.trainer.max_steps} steps of "
                 f"{cfg.train.trainer.batch_size}); the fixed-t validation loss weights every t equally, which is "
                 "what rf/uniform trains for, so the loss ranking alone favours it")
    plots = {f"formulation-{k}": v for k, v in studies.analyze(sweep, results).plots.items()}
    return Section(Finding.formulation, "Formulations at equal compute (Table 1)", "\n".join(lines), verdicts, plots)


def depth(cfg: ReproduceConf, results: pd.DataFrame, sweep: SweepConf) -> Section:
    t = results.sort_values("depth")
    analysis = studies.analyze(sweep, results)
    verdicts = []
    if len(t) >= 2:
        fit = fit_power_law(t["train_flops"], t["val_loss"])
        if fit.b <= 0:
            status, reason = NOT_REPRODUCED, f"the loss does not fall with compute (exponent {fit.b:.4f})"
        elif len(t) < 3:
            status, reason = INCONCLUSIVE, f"exponent {fit.b:.4f}, but a power law fits any {len(t)} points"
        elif fit.r2 >= R2_POWER_LAW:
            status, reason = REPRODUCED, (f"exponent {fit.b:.4f}, R^2 {fit.r2:.3f} >= {R2_POWER_LAW} over {len(t)} "
                                          "depths")
        else:
            status, reason = INCONCLUSIVE, f"exponent {fit.b:.4f} but R^2 {fit.r2:.3f} over {len(t)} depths"
        verdicts.append(Verdict("validation loss is a power law in training compute", "a straight line in log-log "
                                "(Fig. 8), depths 15-38", f"L = {fit.a:.3g} * C^(-{fit.b:.4f}), R^2 {fit.r2:.3f}",
                                status, reason))
    scored = t.dropna(subset=["geneval"]) if "geneval" in t else t.iloc[:0]
    rho, p = spearman_test(-scored["val_loss"], scored["geneval"]) if len(scored) else (math.nan, math.nan)
    status, reason = correlation_verdict(rho, p, "lower loss, higher GenEval-shapes", len(scored))
    verdicts.append(Verdict("validation loss predicts GenEval", "strong correlation (Fig. 8)",
                            f"Spearman(loss, GenEval) {-rho:.3f}" if not math.isnan(rho) else "n/a", status, reason))
    return Section(Finding.depth, "Depth scaling (Fig. 8)", analysis.markdown, verdicts,
                   {f"depth-{k}": v for k, v in analysis.plots.items()})


def steps(cfg: ReproduceConf, results: pd.DataFrame, sweep: SweepConf) -> Section:
    analysis = studies.analyze(sweep, results)
    t = analysis.table
    fewest, most = min(cfg.sampling_steps), max(cfg.sampling_steps)
    ours = t[["depth", f"LFD +% at {fewest}"]]
    rho, p = spearman_test(-ours["depth"], ours[f"LFD +% at {fewest}"])
    status, reason = correlation_verdict(rho, p, "deeper models lose less", len(ours))
    rows = [f"| {d} | " + " | ".join(f"{v:.2f}" for v in losses.values()) + " |"
            for d, losses in paper.STEPS_CLIP_LOSS.items()]
    beside = ["The paper's Table 6 (CLIP-score loss in % against 50 steps):", "",
              "| depth | " + " | ".join(f"{n} steps" for n in next(iter(paper.STEPS_CLIP_LOSS.values()))) + " |",
              "| --- |" + " --- |" * len(next(iter(paper.STEPS_CLIP_LOSS.values()))), *rows]
    body = "\n".join([f"Ours (latent Fréchet distance increase in % against {most} steps, GenEval-shapes at each):",
                      "", analysis.markdown, "", *beside])
    verdict = Verdict(f"larger models lose less at {fewest} steps", "4.30% (d15) > 3.59% (d30) > 2.71% (d38) at 5",
                      ", ".join(f"d{int(d)} {v:.1f}%" for d, v in ours.itertuples(index=False)), status, reason)
    return Section(Finding.steps, "Sampling steps (Table 6)", body, [verdict],
                   {f"steps-{k}": v for k, v in analysis.plots.items()})


def best_shift(row: pd.Series, metric: str, higher: bool) -> tuple[float, float, float]:
    """(best shift, its value, the spread max - min over the shifts) of one trial's `metric@shift=` columns."""
    values = {float(k.split("=", 1)[1]): float(v) for k, v in row.items()
              if k.startswith(f"{metric}@shift=") and pd.notna(v)}
    best = (max if higher else min)(values, key=lambda s: (values[s] if higher else -values[s], -s))
    return best, values[best], max(values.values()) - min(values.values())


def shift(cfg: ReproduceConf, low: pd.DataFrame, high: pd.DataFrame, sweeps: dict[str, SweepConf]) -> Section:
    rule = paper.shift_rule(cfg.high_resolution ** 2, cfg.resolution ** 2)
    plots, lines, verdicts = {}, [], []
    for res, table in ((cfg.resolution, low), (cfg.high_resolution, high)):
        analysis = studies.analyze(sweeps[f"shift-{res}"], table)
        plots |= {f"shift-{res}-{k}": v for k, v in analysis.plots.items()}
        lines += [f"### {res} px", "", analysis.markdown, ""]
    images = images_per_trial(cfg)
    for metric, label, higher in (("geneval", "GenEval-shapes", True), ("lfd", "latent Fréchet distance", False)):
        (b_low, v_low, spread_low), (b_high, v_high, spread_high) = (best_shift(t.iloc[0], metric, higher)
                                                                     for t in (low, high))
        ratio = b_high / b_low
        ours = f"best {b_low:g} at {cfg.resolution} px, {b_high:g} at {cfg.high_resolution} px (ratio {ratio:.2f})"
        if metric == "geneval":
            noise = 2 * math.hypot(geneval_se(v_low, images), geneval_se(v_high, images))
            flat = min(spread_low, spread_high) <= noise
            why = f"within twice its sampling error ({images} images a setting)"
        else:
            flat = min(spread_low / v_low, spread_high / v_high) < LFD_RESOLVES
            why = f"under {LFD_RESOLVES:.0%} of its value"
        if flat:
            status, reason = INCONCLUSIVE, (f"at one resolution {label} varies by at most "
                                            f"{min(spread_low, spread_high):.3g} over the shifts, {why}")
        elif b_high > b_low and abs(math.log(ratio / rule)) <= math.log(RULE_TOLERANCE):
            status, reason = REPRODUCED, f"the best shift grows {ratio:.2f}x, within {RULE_TOLERANCE}x of sqrt(m/n)"
        elif b_high <= b_low:
            status, reason = NOT_REPRODUCED, "the higher resolution does not prefer a larger shift"
        else:
            status, reason = INCONCLUSIVE, (f"a larger shift at the higher resolution, but {ratio:.2f}x against "
                                            f"the rule's {rule:.2f}x (grid {list(cfg.sampling_shifts)})")
        verdicts.append(Verdict(f"the best sampling shift follows alpha = sqrt(m/n) ({label})",
                                f"ratio {rule:.2f} for {cfg.high_resolution}/{cfg.resolution} px; 3.0 at 1024^2",
                                ours, status, reason))
    lines.append(f"- the rule: alpha = sqrt(m/n) = {rule:.2f} between {cfg.high_resolution}^2 and "
                 f"{cfg.resolution}^2 pixels; both runs trained at shift {cfg.train.objective.shift:g}")
    return Section(Finding.shift, "Resolution-dependent shift", "\n".join(lines), verdicts, plots)


def geneval_comparison(claim: str, paper_says: str, before: tuple[str, float, dict], after: tuple[str, float, dict],
                       images: int) -> tuple[str, Verdict]:
    """A per-task table of two GenEval-shapes summaries, and the verdict that the second is higher."""
    (label_a, a, tasks_a), (label_b, b, tasks_b) = before, after
    tags = [t for t in geneval.TAGS if t in tasks_a or t in tasks_b]
    table = pd.DataFrame({"": [label_a, label_b], "overall": [a, b],
                          **{t: [tasks_a.get(t, np.nan), tasks_b.get(t, np.nan)] for t in tags}})
    status, reason = difference_verdict(a, b, geneval_se(a, images), geneval_se(b, images), f"{images} images each")
    return studies.markdown_table(table), Verdict(claim, paper_says, f"{a:.3f} -> {b:.3f}", status, reason)


def difference_verdict(a: float, b: float, se_a: float, se_b: float, sampled: str) -> tuple[str, str]:
    """The verdict on a claim that b exceeds a: reproduced beyond twice the standard error of the difference, not
    reproduced below it by as much, else inconclusive; `sampled` says what the errors come from."""
    margin = 2 * math.hypot(se_a, se_b)
    return {1: (REPRODUCED, f"+{b - a:.3f}, above twice the sampling error ({margin:.3f}, {sampled})"),
            -1: (NOT_REPRODUCED, f"{b - a:+.3f}: lower by more than twice the sampling error ({margin:.3f})"),
            0: (INCONCLUSIVE, f"{b - a:+.3f}, within twice the sampling error ({margin:.3f}, {sampled})")}[
        differs(a, b, se_a, se_b)]


def paired_verdict(change: PairedChange) -> tuple[str, str]:
    """The verdict on a claim that a fine-tune raised GenEval, from the paired change of the same images."""
    sampled = f"paired, {change.images} images scored before and after: {change.gained} gained, {change.lost} lost"
    margin = 2 * change.se
    if change.change > margin:
        return REPRODUCED, f"+{change.change:.3f}, above twice its standard error ({margin:.3f}, {sampled})"
    if -change.change > margin:
        return NOT_REPRODUCED, f"{change.change:+.3f}: lower by more than twice its standard error ({margin:.3f})"
    return INCONCLUSIVE, f"{change.change:+.3f}, within twice its standard error ({margin:.3f}, {sampled})"


def tasks_of(row: pd.Series) -> dict[str, float]:
    """The per-task GenEval-shapes columns of a one-setting study's trial row."""
    columns = {t: f"geneval_{t}" for t in geneval.TAGS}
    return {t: float(row[c]) for t, c in columns.items() if c in row and pd.notna(row[c])}


def captions(cfg: ReproduceConf, original: pd.DataFrame, mix: pd.DataFrame) -> Section:
    a, b = original.iloc[0], mix.iloc[0]
    table, verdict = geneval_comparison(
        "the synthetic-caption mix raises GenEval", f"{paper.CAPTIONS_GENEVAL['original']} -> "
        f"{paper.CAPTIONS_GENEVAL['mix']} (%, d15)", ("original captions", float(a["geneval"]), tasks_of(a)),
        (f"{cfg.caption_mix:.0%} synthetic", float(b["geneval"]), tasks_of(b)), images_per_trial(cfg))
    body = "\n".join([table, "", f"- the synthetic captions name every object's colour and shape, their count and "
                      "relation, derived from the shapes' ground truth (standing in for CogVLM); val loss "
                      f"{a['val_loss']:.4f} (original) and {b['val_loss']:.4f} (mix) on held-out rows"])
    return Section(Finding.captions, "Synthetic captions (Table 4)", body, [verdict])


def dpo(cfg: ReproduceConf, preference) -> Section:
    claim, says = "DPO raises GenEval", f"{paper.DPO_GENEVAL['before']} -> {paper.DPO_GENEVAL['after']} (d38, 512^2)"
    if preference is None or preference.summary is None or preference.summary.get("geneval_before") is None:
        why = preference.skipped if preference is not None and preference.skipped else "DPO did not run"
        return Section(Finding.dpo, "Preference tuning (Table 5)", f"- skipped: {why}",
                       [Verdict(claim, says, "n/a", INCONCLUSIVE, why)])
    s = preference.summary
    images = images_per_trial(cfg, cfg.dpo_geneval_images_per_prompt)
    table, verdict = geneval_comparison(claim, says, ("before DPO", s["geneval_before"], s["geneval_tasks_before"]),
                                        ("after DPO", s["geneval_after"], s["geneval_tasks_after"]), images)
    change = PairedChange.of_summary(s, images)
    if change is not None:  # the same prompts and noise before and after: each image's own difference
        status, reason = paired_verdict(change)
        verdict = Verdict(claim, says, verdict.ours, status, reason)
    pairs = preference.pairs["counts"]["written"] if preference.pairs else 0
    base = "the shipped shapes reference model" if cfg.dpo_base == DPOBase.reference else "the studies' best run"
    body = "\n".join([table, "", f"- {pairs} pairs from the samples of {base}, judged by GenEval-shapes; "
                      f"{cfg.dpo_steps} steps on rank-{cfg.dpo_rank} LoRA adapters; held-out prompts",
                      *([f"- {change.line()}"] if change is not None else [])])
    return Section(Finding.dpo, "Preference tuning (Table 5)", body, [verdict])


def analyze(cfg: ReproduceConf, results: dict[str, pd.DataFrame], preference, sweeps: dict[str, SweepConf],
            reconstructed: pd.DataFrame | None = None) -> list[Section]:
    """The sections of the chosen findings, in `Finding`'s order; `reconstructed` is the autoencoder finding's
    reconstruction table (`autoencoder.reconstruction`)."""
    out, wanted = [], set(cfg.findings)
    if Finding.formulation in wanted:
        out.append(formulation(cfg, results["formulation"], sweeps["formulation"]))
    if Finding.depth in wanted:
        out.append(depth(cfg, results["depth"], sweeps["depth"]))
    if Finding.shift in wanted:
        out.append(shift(cfg, results[f"shift-{cfg.resolution}"], results[f"shift-{cfg.high_resolution}"], sweeps))
    if Finding.steps in wanted:
        out.append(steps(cfg, results["steps"], sweeps["steps"]))
    if Finding.captions in wanted:
        out.append(captions(cfg, results["captions-original"], results["captions-mix"]))
    if Finding.dpo in wanted:
        out.append(dpo(cfg, preference))
    if Finding.autoencoder in wanted:
        from workloads.reproduce import autoencoder  # it builds on this module's verdicts

        series = {n: results[f"channels-c{n}"] for n in sorted(set(cfg.channels)) if f"channels-c{n}" in results}
        out.append(autoencoder.section(cfg, reconstructed, series))
    return out

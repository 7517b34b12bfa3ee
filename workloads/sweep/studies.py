"""The four studies of `workloads.sweep`: each trial's parameters, and the analysis of a set of finished trials
(tables, fits, plots) that `workloads.sweep` writes as the sweep goes."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from conf.sweep import Study, SweepConf
from model.formulations import PAPER_GLOBAL_RANK
from workloads.plots import plt  # matplotlib with the Agg back end
from workloads.sweep.scaling import fit_power_law


def trial_params(cfg: SweepConf) -> list[dict]:
    """One dict per trial: the training run's depth, training shift and formulation."""
    t = cfg.train.objective
    if cfg.study not in tuple(Study):
        raise ValueError(f"study must be one of {[s.value for s in Study]}, got {cfg.study!r}")
    if cfg.study in ("depth", "steps"):
        return [{"depth": d, "train_shift": t.shift, "formulation": t.formulation} for d in cfg.depths]
    if cfg.study == "shift":
        return [{"depth": cfg.study_depth, "train_shift": a, "formulation": t.formulation} for a in cfg.training_shifts]
    return [{"depth": cfg.study_depth, "train_shift": t.shift, "formulation": f} for f in cfg.formulations]


def eval_settings(cfg: SweepConf, train_shift: float) -> list[tuple[int, float]]:
    """(sampling steps, sampling shift) pairs each trial evaluates after training; the first is the reference."""
    if cfg.study == "shift":
        return [(cfg.eval_sample_steps, s) for s in cfg.sampling_shifts]
    if cfg.study == "steps":
        return [(n, train_shift) for n in sorted(cfg.sampling_steps, reverse=True)]
    return []


@dataclass
class Analysis:
    table: pd.DataFrame  # the study's main table
    markdown: str  # report body
    plots: dict[str, bytes]  # file name -> PNG


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; floats with 4 significant digits."""
    def cell(value) -> str:
        if isinstance(value, float | np.floating):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _next_depth(cfg: SweepConf, table: pd.DataFrame) -> tuple[int, int, float]:
    """(depth, parameters, training FLOPs) of the next depth of the series, for the fits' predictions."""
    from conf.model import ModelConf
    from model import count_params, train_flops

    last = int(table["depth"].iloc[-1])
    depth = last + int(last - table["depth"].iloc[-2])
    build = lambda d: ModelConf.at_depth(cfg.train.model.flavor, d).build()  # noqa: E731
    ratio = train_flops(build(depth), 32, 32) / train_flops(build(last), 32, 32)  # per sample, at 256 px
    return depth, count_params(build(depth)), float(table["train_flops"].iloc[-1]) * ratio


def _depth(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    table = results.sort_values("depth")[["depth", "params", "flops_per_sample", "train_flops", "val_loss",
                                          "samples_per_s"]].reset_index(drop=True)
    lines = [markdown_table(table), ""]
    plots = {}
    if len(table) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, column, variable, label in ((axes[0], "train_flops", "C", "C (training FLOPs)"),
                                            (axes[1], "params", "N", "N (parameters)")):
            fit = fit_power_law(table[column], table["val_loss"])
            x = np.geomspace(table[column].min(), table[column].max() * 2, 50)
            ax.loglog(table[column], table["val_loss"], "o", label="trials")
            ax.loglog(x, fit.predict(x), "-", label=fit.formula(variable))
            ax.set_xlabel(label)
            ax.set_ylabel("final EMA validation loss")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
            ax.legend(fontsize=7)
            lines.append(f"- against {variable}: `{fit.formula(variable)}`, exponent {fit.b:.4f}, R^2 {fit.r2:.4f} "
                         f"({fit.points} points)")
            if len(table) >= 3:
                offset = fit_power_law(table[column], table["val_loss"], offset=True)
                lines.append(f"  - with an irreducible term: `{offset.formula(variable)}`, R^2 {offset.r2:.4f}")
        depth, params, flops = _next_depth(cfg, table)
        by_c = fit_power_law(table["train_flops"], table["val_loss"]).predict(flops)
        by_n = fit_power_law(table["params"], table["val_loss"]).predict(params)
        lines.append(f"- predicted final validation loss at depth {depth} ({params:,} parameters, {flops:.3g} "
                     f"training FLOPs): {by_c:.4f} from the compute fit, {by_n:.4f} from the parameter fit")
        plots["scaling.png"] = _png(fig)
    return Analysis(table, "\n".join(lines), plots)


def _shift(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    rows = [{"train_shift": r["train_shift"], "sampling_shift": s, "lfd": r[f"lfd@shift={s:g}"]}
            for _, r in results.iterrows() for s in sorted(_keys(r, "lfd@shift="))]
    table = pd.DataFrame(rows).pivot(index="sampling_shift", columns="train_shift", values="lfd")
    table.columns = [f"LFD, trained at shift {c:g}" for c in table.columns]
    table = table.reset_index()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in table.columns[1:]:
        ax.plot(table["sampling_shift"], table[column], "o-", label=column)
    ax.set_xscale("log")
    ax.set_xlabel("sampling shift alpha")
    ax.set_ylabel("latent Fréchet distance (lower is better)")
    ax.legend(fontsize=7)
    best = {c: float(table.loc[table[c].idxmin(), "sampling_shift"]) for c in table.columns[1:]}
    lines = [markdown_table(table), ""]
    lines += [f"- best sampling shift for '{c}': {b:g}" for c, b in best.items()]
    return Analysis(table, "\n".join(lines), {"shift.png": _png(fig)})


def _formulation(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    table = results.sort_values("val_loss")[["formulation", "val_loss"]].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table["paper_global_rank"] = [PAPER_GLOBAL_RANK.get(f) for f in table["formulation"]]
    known = table.dropna(subset=["paper_global_rank"])
    lines = [markdown_table(table), ""]
    if len(known) >= 2:
        ours = known["rank"].rank().to_numpy()
        paper = known["paper_global_rank"].rank().to_numpy()
        rho = float(np.corrcoef(ours, paper)[0, 1])
        lines.append(f"- Spearman correlation with the paper's global ranking (Table 1) over {len(known)} "
                     f"formulations: {rho:.3f}")
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(table) + 1.5))
    ax.barh(table["formulation"][::-1], table["val_loss"][::-1])
    ax.set_xlabel("final EMA validation loss (equal compute)")
    return Analysis(table, "\n".join(lines), {"formulations.png": _png(fig)})


def _steps(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    rows = []
    for _, r in results.sort_values("depth").iterrows():
        steps = sorted(int(k) for k in _keys(r, "lfd@steps="))
        reference = r[f"lfd@steps={steps[-1]}"]
        row = {"depth": r["depth"], f"LFD at {steps[-1]}": reference}
        for n in steps[:-1]:
            row[f"LFD +% at {n}"] = 100 * (r[f"lfd@steps={n}"] - reference) / reference
            row[f"change at {n}"] = r[f"change@steps={n}"]
        rows.append(row)
    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in [c for c in table.columns if c.startswith("LFD +%")]:
        ax.plot(table["depth"], table[column], "o-", label=column)
    ax.set_xlabel("depth")
    ax.set_ylabel("LFD increase vs the most steps (%)")
    ax.legend(fontsize=7)
    return Analysis(table, markdown_table(table), {"steps.png": _png(fig)})


def _keys(row: pd.Series, prefix: str) -> list[float]:
    return [float(k[len(prefix):]) for k in row.index if k.startswith(prefix) and pd.notna(row[k])]


ANALYSES = {"depth": _depth, "shift": _shift, "formulation": _formulation, "steps": _steps}


def analyze(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    return ANALYSES[cfg.study](cfg, results)

"""The four studies of `workloads.sweep`: each trial's parameters, and the analysis of a set of finished trials
(tables, fits, plots) that `workloads.sweep` writes as the sweep goes."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from conf.sweep import Study, SweepConf
from model.formulations import paper_global_rank
from workloads.plots import pyplot  # matplotlib on the Agg back end, imported when a figure is drawn
from workloads.sweep.scaling import fit_power_law


def trial_params(cfg: SweepConf) -> list[dict]:
    """One dict per trial: the training run's depth, training shift and formulation (and in the recipe study the
    trial's name and every knob's value)."""
    t = cfg.train.objective
    if cfg.study not in tuple(Study):
        raise ValueError(f"study must be one of {[s.value for s in Study]}, got {cfg.study!r}")
    if cfg.study == "recipe":
        from workloads.sweep import recipe

        return [{"depth": int(p["knobs"]["depth"]), "train_shift": t.shift, "formulation": t.formulation, **p}
                for p in recipe.trials(cfg.recipe)]
    if cfg.study in ("depth", "steps"):
        return [{"depth": d, "train_shift": t.shift, "formulation": t.formulation} for d in cfg.depths]
    if cfg.study == "transfer":
        return [{"depth": d, "train_shift": t.shift, "formulation": t.formulation, "lr": float(lr),
                 "parametrization": kind} for kind in cfg.parametrizations for d in cfg.depths for lr in cfg.lrs]
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


def geneval_settings(cfg: SweepConf, train_shift: float) -> list[tuple[int, float]]:
    """The (steps, shift) pairs each trial's GenEval-shapes samples: the latent metric's in the shift and steps
    studies, one (`eval_sample_steps`, the training shift) in the depth and formulation studies; none when off."""
    if not cfg.geneval_prompts_per_task or cfg.study == "recipe":  # recipe trials score themselves as they train
        return []
    return eval_settings(cfg, train_shift) or [(cfg.eval_sample_steps, train_shift)]


def metric_column(cfg: SweepConf, metric: str, steps: int, shift: float) -> str:
    """A trial row's column of one metric at one sampling setting: `lfd@shift=3`, `geneval@steps=10`, or just
    `geneval` in the studies that sample one setting."""
    if cfg.study == "shift":
        return f"{metric}@shift={shift:g}"
    if cfg.study == "steps":
        return f"{metric}@steps={steps}"
    return metric


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
    pyplot().close(fig)
    return buffer.getvalue()


def _next_depth(cfg: SweepConf, table: pd.DataFrame) -> tuple[int, int, float]:
    """(depth, parameters, training FLOPs) of the next depth of the series, for the fits' predictions."""
    from model import count_params, train_flops

    last = int(table["depth"].iloc[-1])
    depth = last + int(last - table["depth"].iloc[-2])
    build = lambda d: cfg.train.model.with_depth(d).build()  # noqa: E731
    ratio = train_flops(build(depth), 32, 32) / train_flops(build(last), 32, 32)  # per sample, at 256 px
    return depth, count_params(build(depth)), float(table["train_flops"].iloc[-1]) * ratio


def has_geneval(results: pd.DataFrame, column: str = "geneval") -> bool:
    """Whether the trials carry GenEval-shapes (older sweeps, or geneval_prompts_per_task=0, do not)."""
    return column in results and bool(results[column].notna().any())


# the partial credits a study's table shows beside GenEval-shapes (`pipelines.geneval.credit`), with chance levels
CREDIT_COLUMNS = ("credit_count", "chance_count", "credit_colors", "chance_colors", "credit_shapes", "chance_shapes",
                  "credit_empty")


def credit_columns(results: pd.DataFrame) -> list[str]:
    """The partial-credit columns the trials carry (none for sweeps scored before they joined)."""
    return [c for c in CREDIT_COLUMNS if c in results and bool(results[c].notna().any())]


def correlation(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    """(Pearson, Spearman) correlation of two columns."""
    x, y = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
    pearson = float(np.corrcoef(x, y)[0, 1])
    spearman = float(np.corrcoef(pd.Series(x).rank(), pd.Series(y).rank())[0, 1])
    return pearson, spearman


def _depth(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    geneval = has_geneval(results)
    columns = ["depth", "params", "flops_per_sample", "train_flops", "val_loss", *(["geneval"] if geneval else []),
               *credit_columns(results), "samples_per_s"]
    table = results.sort_values("depth")[columns].reset_index(drop=True)
    lines = [markdown_table(table), ""]
    plots = {}
    if len(table) >= 2:
        fig, axes = pyplot().subplots(1, 3 if geneval else 2, figsize=(15 if geneval else 10, 4))
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
        if geneval:
            lines.append(_loss_against_geneval(axes[2], table))
        plots["scaling.png"] = _png(fig)
    return Analysis(table, "\n".join(lines), plots)


def _loss_against_geneval(ax, table: pd.DataFrame) -> str:
    """The paper's claim that validation loss predicts GenEval (Fig. 8): the scatter, and the report line."""
    scored = table.dropna(subset=["geneval"])
    ax.plot(scored["val_loss"], scored["geneval"], "o")
    for _, row in scored.iterrows():
        ax.annotate(f"d{int(row['depth'])}", (row["val_loss"], row["geneval"]), fontsize=7)
    ax.set_xlabel("final EMA validation loss")
    ax.set_ylabel("GenEval-shapes overall")
    if len(scored) < 2 or scored["geneval"].nunique() < 2:
        return f"- validation loss against GenEval-shapes: {len(scored)} scored trial(s), too few to correlate"
    pearson, spearman = correlation(scored["val_loss"], scored["geneval"])
    return (f"- validation loss against GenEval-shapes over {len(scored)} depths: Pearson {pearson:.3f}, Spearman "
            f"{spearman:.3f} (the paper: lower loss, higher score, i.e. negative)")


def _pivot(results: pd.DataFrame, metric: str, label: str) -> pd.DataFrame:
    """The shift study's `metric` as sampling shift x training shift."""
    rows = [{"train_shift": r["train_shift"], "sampling_shift": s, "value": r[f"{metric}@shift={s:g}"]}
            for _, r in results.iterrows() for s in sorted(_keys(r, f"{metric}@shift="))]
    table = pd.DataFrame(rows).pivot(index="sampling_shift", columns="train_shift", values="value")
    table.columns = [f"{label}, trained at shift {c:g}" for c in table.columns]
    return table


def _shift(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    lfd = _pivot(results, "lfd", "LFD")
    geneval = _pivot(results, "geneval", "GenEval") if any(_keys(r, "geneval@shift=") for _, r in
                                                           results.iterrows()) else None
    table = (lfd if geneval is None else lfd.join(geneval)).reset_index()
    fig, axes = pyplot().subplots(1, 1 if geneval is None else 2, figsize=(6 if geneval is None else 12, 4),
                                  squeeze=False)
    lines = []
    for ax, part, ylabel, pick in ((axes[0][0], lfd, "latent Fréchet distance (lower is better)", "idxmin"),
                                   *(((axes[0][1], geneval, "GenEval-shapes (higher is better)", "idxmax"),)
                                     if geneval is not None else ())):
        for column in part.columns:
            ax.plot(part.index, part[column], "o-", label=column)
            lines.append(f"- best sampling shift for '{column}': {getattr(part[column], pick)():g}")
        ax.set_xscale("log")
        ax.set_xlabel("sampling shift alpha")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    return Analysis(table, "\n".join([markdown_table(table), "", *lines]), {"shift.png": _png(fig)})


def _formulation(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    geneval = has_geneval(results)
    table = results.sort_values("val_loss")[["formulation", "val_loss", *(["geneval"] if geneval else [])]]
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    if geneval:
        table["geneval_rank"] = table["geneval"].rank(ascending=False, method="min").astype(int)
    table["paper_global_rank"] = [paper_global_rank(f) for f in table["formulation"]]
    known = table.dropna(subset=["paper_global_rank"])
    lines = [markdown_table(table), ""]
    if len(known) >= 2:
        for column, by in (("rank", "validation loss"), *((("geneval_rank", "GenEval-shapes"),) if geneval else ())):
            rho = correlation(known[column], known["paper_global_rank"])[1]
            lines.append(f"- ranked by {by}: Spearman correlation with the paper's global ranking (Table 1) over "
                         f"{len(known)} formulations: {rho:.3f}")
    fig, axes = pyplot().subplots(1, 2 if geneval else 1, figsize=(14 if geneval else 7, 0.4 * len(table) + 1.5),
                                  squeeze=False)
    axes[0][0].barh(table["formulation"][::-1], table["val_loss"][::-1])
    axes[0][0].set_xlabel("final EMA validation loss (equal compute)")
    if geneval:
        axes[0][1].barh(table["formulation"][::-1], table["geneval"][::-1], color="tab:green")
        axes[0][1].set_xlabel("GenEval-shapes overall (equal compute)")
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
        row |= {f"GenEval at {int(n)}": r[f"geneval@steps={int(n)}"] for n in sorted(_keys(r, "geneval@steps="))}
        rows.append(row)
    table = pd.DataFrame(rows)
    geneval = [c for c in table.columns if c.startswith("GenEval at")]
    fig, axes = pyplot().subplots(1, 2 if geneval else 1, figsize=(12 if geneval else 6, 4), squeeze=False)
    for column in [c for c in table.columns if c.startswith("LFD +%")]:
        axes[0][0].plot(table["depth"], table[column], "o-", label=column)
    axes[0][0].set_xlabel("depth")
    axes[0][0].set_ylabel("LFD increase vs the most steps (%)")
    axes[0][0].legend(fontsize=7)
    if geneval:
        for column in geneval:
            axes[0][1].plot(table["depth"], table[column], "o-", label=column)
        axes[0][1].set_xlabel("depth")
        axes[0][1].set_ylabel("GenEval-shapes overall")
        axes[0][1].legend(fontsize=7)
    return Analysis(table, markdown_table(table), {"steps.png": _png(fig)})


def _keys(row: pd.Series, prefix: str) -> list[float]:
    return [float(k[len(prefix):]) for k in row.index if k.startswith(prefix) and pd.notna(row[k])]


def _recipe(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    from workloads.sweep import recipe

    return recipe.analyze(cfg, results)


def _transfer(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    from workloads.sweep import transfer

    return transfer.analyze(cfg, results)


ANALYSES = {"depth": _depth, "shift": _shift, "formulation": _formulation, "steps": _steps, "recipe": _recipe,
            "transfer": _transfer}


def analyze(cfg: SweepConf, results: pd.DataFrame) -> Analysis:
    return ANALYSES[cfg.study](cfg, results)

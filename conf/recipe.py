"""The recipe study's schema (`python -m workloads.sweep preset=recipe`): which knobs of the toy and of the training
recipe it tries, at what equal training compute, and how successive halving stops the poor trials early.

A knob is one named setting with one home in an existing config: the shapes generator's style and the preprocessing
resolution and autoencoder (a data variant, made once per distinct setting), the MM-DiT's size and patch, the
optimiser and EMA, and the sampler (tried on the best trained network, as they need no training). `KNOBS` lists them.
The trials are the `base` recipe and, for each axis, each of its values with every other knob at its base value
(one knob at a time), so each knob's effect is measured against the same base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# knob -> (where it lives, what it sets): `data` (the data variant), `train` (the trial's TrainConf, dotted path),
# `sampling` (GenEval of the best trained network)
KNOBS: dict[str, tuple[str, str]] = {
    "object_size": ("data", "min_side,max_side"),  # [min, max] side as a fraction of the canvas
    "max_objects": ("data", "max_objects"),
    "background_low": ("data", "background_low"),
    "resolution": ("data", "resolution"),  # pixels; latents 1/8 of it
    "latent_channels": ("data", "latent_channels"),  # the shapes autoencoder's (`pipelines.synthetic.shapes_vae`)
    "depth": ("train", "model.depth"),  # with the paper's width rule: hidden 64 * depth, depth heads
    "patch_size": ("train", "model.patch_size"),
    "lr": ("train", "optim.lr"),
    "batch_size": ("train", "trainer.batch_size"),
    "ema_decay": ("train", "ema.decay"),
    "warmup_steps": ("train", "optim.warmup_steps"),
    "guidance": ("sampling", "guidance"),
    "guidance_below": ("sampling", "guidance_below"),  # CFG only at t <= this (a guidance interval)
    "sampling_shift": ("sampling", "shift"),
    "sample_steps": ("sampling", "steps"),
}


def default_base() -> dict[str, Any]:
    return {"object_size": [0.16, 0.30], "max_objects": 4, "background_low": 215, "resolution": 64,
            "latent_channels": 16, "depth": 2, "patch_size": 2, "lr": 1e-3, "batch_size": 32, "ema_decay": 0.99,
            "warmup_steps": 30, "guidance": 4.0, "guidance_below": 1.0, "sampling_shift": 1.0, "sample_steps": 20}


@dataclass
class RecipeConf:
    """The recipe study: `base` (every knob's value; `KNOBS`), `axes` (knob -> values tried one at a time from the
    base), `budget_flops` (training FLOPs of every trial, so steps = budget / (FLOPs a sample x batch size)), and
    successive halving (ASHA) on `metric`: every trial reports GenEval-shapes `reports` times, at equal fractions of
    its budget; from the `grace` report on (and before the last), a trial below the best 1/`reduction_factor` of the
    trials that reached that point stops."""

    base: dict[str, Any] = field(default_factory=default_base)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    budget_flops: float = 1e13
    images: int = 3000  # shapes images generated for each data variant
    reports: int = 3
    grace: int = 1
    reduction_factor: int = 2
    metric: str = "geneval"  # or a partial credit: credit_count, credit_colors, credit_shapes
    # the sampling axes are tried on this many of the best finished trials
    sampling_top: int = 1

    def __post_init__(self) -> None:
        unknown = sorted((set(self.base) | set(self.axes)) - set(KNOBS))
        if unknown:
            raise ValueError(f"recipe: unknown knob(s) {unknown}; the knobs are {sorted(KNOBS)}")
        missing = sorted(set(KNOBS) - set(self.base))
        if missing:
            raise ValueError(f"recipe.base must give every knob a value, missing {missing}")
        for name, values in self.axes.items():
            if not list(values):
                raise ValueError(f"recipe.axes.{name} must list at least one value")
        for name, low in (("budget_flops", 1.0), ("images", 1), ("reports", 2), ("grace", 1),
                          ("reduction_factor", 2), ("sampling_top", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"recipe.{name} must be >= {low}, got {getattr(self, name)}")
        if self.grace >= self.reports:  # a stop at the last report would save nothing
            raise ValueError(f"recipe.grace ({self.grace}) must be < recipe.reports ({self.reports})")
        metrics = ("geneval", "credit_count", "credit_colors", "credit_shapes", "credit_relation")
        if self.metric not in metrics:
            raise ValueError(f"recipe.metric must be one of {metrics}, got {self.metric!r}")
        size = list(self.base["object_size"])
        if len(size) != 2:
            raise ValueError(f"recipe object_size values are [min_side, max_side], got {size}")


def recipe_presets() -> dict[str, dict]:
    """The sweep presets of the recipe study: `recipe` (about two hours on 2 cores, two trials at a time; depth 1 is
    left out: at equal FLOPs its 35,000 steps would take most of them, a tiny network's step costing far more than its
    FLOPs on a CPU) and `recipe_quick` (minutes: the machinery, on a few hundred images)."""
    train = {"trainer": {"num_workers": 1, "cpus_per_worker": 1.0},
             "objective": {"synthetic_caption_prob": 0.0, "text_drop_prob": 0.1},
             "validation": {"samples": 64, "grid_prompts": 2, "grid_per_prompt": 2, "text_gap": False,
                            "geneval_prompts_per_task": 4, "geneval_images_per_prompt": 2}}
    default = {
        "axes": {"object_size": [[0.3, 0.45]], "max_objects": [3], "background_low": [255], "resolution": [128],
                 "latent_channels": [4, 8], "patch_size": [1, 4], "depth": [3], "lr": [3e-4, 3e-3],
                 "batch_size": [16, 64], "ema_decay": [0.999], "warmup_steps": [300],
                 "guidance": [1.0, 2.0, 3.0, 5.0], "guidance_below": [0.6, 0.8], "sampling_shift": [3.0],
                 "sample_steps": [40]},
        "budget_flops": 1e13, "images": 3000, "reports": 3, "grace": 1, "reduction_factor": 2}
    quick = {
        "axes": {"object_size": [[0.3, 0.45]], "lr": [3e-3], "guidance": [2.0], "guidance_below": [0.6]},
        "budget_flops": 3e10, "images": 96, "reports": 2, "grace": 1, "reduction_factor": 2}
    return {
        # the sampling trials score 8 prompts of each task, 2 images each
        "recipe": {"preset": "recipe", "study": "recipe", "recipe": default, "train": train,
                   "geneval_prompts_per_task": 8, "geneval_images_per_prompt": 2, "max_concurrent_trials": 2},
        "recipe_quick": {"preset": "recipe_quick", "study": "recipe", "recipe": quick,
                         "train": train | {"validation": train["validation"] | {"samples": 16,
                                                                               "geneval_prompts_per_task": 1,
                                                                               "geneval_images_per_prompt": 1}}},
    }

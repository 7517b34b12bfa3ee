"""The shapes reference model the repository ships (`pipelines/synthetic/weights/shapes-reference`, made by
`python -m workloads.reference ... ship_to=`): where it is, its card, and how to score it with the evaluation job."""

from __future__ import annotations

import json
from pathlib import Path

import pipelines.synthetic
from conf.evaluate import EvaluateConf
from conf.reference import ReferenceConf
from workloads.reference.driver import CARD

SHIPPED = Path(pipelines.synthetic.__file__).parent / "weights" / "shapes-reference"


def folder() -> Path:
    """The shipped model's folder (a diffusers `SD3Transformer2DModel` folder with its card); a clear error when it is
    missing."""
    if not (SHIPPED / CARD).is_file():
        raise FileNotFoundError(f"the shapes reference model is missing from {SHIPPED}: make it with "
                                f"`python -m workloads.reference storage=<dir> ship_to={SHIPPED}`")
    return SHIPPED


def card() -> dict:
    """How it was made: the recipe, the command, the step and training FLOPs it holds, its GenEval-shapes curve."""
    return json.loads((folder() / CARD).read_text())


def recipe() -> ReferenceConf:
    """The `workloads.reference` config the shipped model was made with (its card's `recipe`), schema-checked."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReferenceConf), card()["recipe"]))


def evaluate_conf(out: str, tiny_dir: str, **settings) -> EvaluateConf:
    """GenEval-shapes of the shipped model's samples (`settings`: prompts_per_task, images_per_prompt, guidance, ...),
    with the tiny text encoders and the shapes autoencoder its data was encoded with (built under `tiny_dir`)."""
    from pipelines.synthetic.tiny_models import build_tiny_models

    made = card()
    models = build_tiny_models(tiny_dir, latent_channels=int(made["recipe"]["latent_channels"])).repo
    return EvaluateConf(run=str(folder()), models=models, out=out, resolution=int(made["resolution"]), **settings)

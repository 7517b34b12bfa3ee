"""The shapes generator's style (`pipelines.synthetic.shapes`), a schema shared by `make_shapes`, the demo and the
recipe study: how the objects are drawn; the captions stay GenEval prompts and their scoring does not change."""

from __future__ import annotations

from dataclasses import dataclass

# The detector (`pipelines.geneval.detect`) takes a blob of under 0.5% of the image for noise and a pixel within 40
# of the background for background: objects below a tenth of the side, or backgrounds darker than 215 per channel
# (the colours' own range), would be misread, so the style stays inside these bounds.
SIDE_RANGE = (0.1, 0.6)
BACKGROUND_RANGE = (215, 255)
OBJECTS_RANGE = (2, 4)  # GenEval's counting prompts ask for two to four objects (`pipelines.geneval.COUNTS`)
# the latent widths of the shapes autoencoders the repository ships (`pipelines.synthetic.shapes_vae.shipped`):
# SD3's 16, and the 4 and 8 of the paper's Table 3
AUTOENCODER_CHANNELS = (4, 8, 16)
AUTOENCODER_DOWNSAMPLE = 8  # every shipped one shrinks each side 8x, as SD3's VAE: latents are 1/8 of the pixels


@dataclass(frozen=True)
class Style:
    """Objects' side as a fraction of the canvas, drawn uniformly from [min_side, max_side]; at most `max_objects`
    objects (counting prompts ask for two up to it); each background channel uniform in [background_low, 255] (255:
    white). The defaults are the dataset's own, sample for sample."""

    min_side: float = 0.16
    max_side: float = 0.30
    max_objects: int = 4
    background_low: int = 215

    def __post_init__(self) -> None:
        lo, hi = SIDE_RANGE
        if not lo <= self.min_side <= self.max_side <= hi:
            raise ValueError(f"shapes style: need {lo} <= min_side <= max_side <= {hi}, got min_side={self.min_side} "
                             f"max_side={self.max_side}")
        if not OBJECTS_RANGE[0] <= self.max_objects <= OBJECTS_RANGE[1]:
            raise ValueError(f"shapes style: max_objects must be in [{OBJECTS_RANGE[0]}, {OBJECTS_RANGE[1]}], got "
                             f"{self.max_objects}")
        if not BACKGROUND_RANGE[0] <= self.background_low <= BACKGROUND_RANGE[1]:
            raise ValueError(f"shapes style: background_low must be in [{BACKGROUND_RANGE[0]}, {BACKGROUND_RANGE[1]}], "
                             f"got {self.background_low}")

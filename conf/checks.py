"""Checks shared by the job configs: choice fields as enums (a bad value fails at override time naming the allowed
ones), range checks that name the field, the sampling jobs' skip-layer guidance fields, and `validate` for configs
made or changed in code.

Each enum is built from the tuple its component owns (one place per fact); members are strings (or ints), so they
compare equal to the plain values the components take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum

from conf.choices import EMBEDDERS, FORMATS, SYNTHETIC_CAPTIONS
from model.mmdit import check_skip_layers
from model.precision import DTYPES
from model.sampling import SAMPLERS, SD35_MEDIUM_SLG, SkipLayerGuidance


def _choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    return StrEnum(name, [(v, v) for v in values], module=__name__)


Dtype = _choices("Dtype", ("auto", *DTYPES))  # auto: the component's default for the device
Sampler = _choices("Sampler", SAMPLERS)
InputFormat = _choices("InputFormat", ("auto", *FORMATS))
ModelsKind = _choices("ModelsKind", ("tiny", "sd3"))
SyntheticCaptions = _choices("SyntheticCaptions", SYNTHETIC_CAPTIONS)  # preprocessing's: the captioner's or the input's
EmbedderKind = _choices("EmbedderKind", EMBEDDERS)  # the deduplication job's image embedding
Device = _choices("Device", ("auto", "cpu", "cuda"))
# torch.compile's backend for the training job's blocks: inductor (the fast one), or aot_eager / eager to debug (and
# for tests: the same graph capture without code generation)
CompileBackend = _choices("CompileBackend", ("inductor", "aot_eager", "eager"))
# What a training run optimises: the flow objective of `objective.formulation`, or Diffusion-DPO on preference pairs.
Objective = _choices("Objective", ("flow", "dpo"))


# DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards the optimizer state, 2 also the gradients, 3 also the weights.
ZeroStage = IntEnum("ZeroStage", [(str(stage), stage) for stage in range(4)], module=__name__)


def at_least(owner: object, minimum: float, *names: str, optional: bool = False) -> None:
    """Raise ValueError naming `<section>.<field>` when a numeric field is below `minimum` (None passes with
    `optional`)."""
    section = getattr(owner, "SECTION", type(owner).__name__)
    for name in names:
        value = getattr(owner, name)
        if optional and value is None:
            continue
        if value < minimum:
            raise ValueError(f"{section}.{name} must be >= {minimum:g}{' (or null)' if optional else ''}, got {value}")


def positive(owner: object, *names: str, optional: bool = False) -> None:
    """Raise ValueError naming `<section>.<field>` unless a numeric field is > 0 (or None, with `optional`)."""
    section = getattr(owner, "SECTION", type(owner).__name__)
    for name in names:
        value = getattr(owner, name)
        if optional and value is None:
            continue
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{section}.{name} must be > 0{' (or null)' if optional else ''}, got {value}")


def one_of(owner: object, name: str, choices: type[Enum]) -> None:
    """Raise ValueError naming `<section>.<field>` when a plain string field is not a value of the enum `choices`
    (for fields typed `str` whose callers pass strings)."""
    value = getattr(owner, name)
    allowed = [m.value for m in choices]
    if value not in allowed:
        section = getattr(owner, "SECTION", type(owner).__name__)
        raise ValueError(f"{section}.{name} must be one of {allowed}, got {value!r}")


def in_unit_interval(owner: object, *names: str, open_right: bool = False) -> None:
    section = getattr(owner, "SECTION", type(owner).__name__)
    for name in names:
        value = getattr(owner, name)
        if not (0.0 <= value < 1.0 if open_right else 0.0 <= value <= 1.0):
            raise ValueError(f"{section}.{name} must be in [0, 1{')' if open_right else ']'}, got {value}")


def guidance_interval(owner: object) -> None:
    """Raise ValueError naming `<section>.guidance_below` unless it is in (0, 1]: CFG applies at t <= it, 1 at every
    step (`model.sampling.guided_velocity`)."""
    value = owner.guidance_below
    if not 0.0 < value <= 1.0:
        section = getattr(owner, "SECTION", type(owner).__name__)
        raise ValueError(f"{section}.guidance_below must be in (0, 1] (1: guidance at every step), got {value}")


@dataclass
class SkipLayerFields:
    """The skip-layer guidance fields every sampling job's config takes (validation, evaluation, pairs, the sweep):
    v += skip_layer_scale (v_cond - v_cond with the `skip_layers` blocks skipped) at the steps between
    skip_layer_start and skip_layer_stop (fractions of the steps); []: off. SD3.5 Medium: skip_layers=[7,8,9] with
    the defaults. A config calls `check_skip_layer_fields` in its `__post_init__`."""

    skip_layers: list[int] = field(default_factory=list)
    skip_layer_scale: float = SD35_MEDIUM_SLG.scale
    skip_layer_start: float = SD35_MEDIUM_SLG.start
    skip_layer_stop: float = SD35_MEDIUM_SLG.stop

    @property
    def skip_layer_guidance(self) -> SkipLayerGuidance | None:
        """The setting, None while `skip_layers` is empty."""
        return self.check_skip_layer_fields()

    def check_skip_layer_fields(self) -> SkipLayerGuidance | None:
        """The setting (None while `skip_layers` is empty); a bad value raises naming `<section>.<field>`."""
        section = getattr(self, "SECTION", type(self).__name__)
        layers = tuple(self.skip_layers)
        if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"{section}.skip_layers must be distinct block indices >= 0 ([] turns skip-layer "
                             f"guidance off), got {list(layers)}")
        at_least(self, 0, "skip_layer_scale")
        in_unit_interval(self, "skip_layer_start", "skip_layer_stop")
        start, stop = self.skip_layer_start, self.skip_layer_stop
        if start >= stop:
            raise ValueError(f"{section}.skip_layer_start must be below {section}.skip_layer_stop (fractions of the "
                             f"steps), got {start} and {stop}")
        return SkipLayerGuidance(layers, self.skip_layer_scale, start, stop) if layers else None

    def check_skip_layers_fit(self, depth: int, where: str = "") -> None:
        """Raise naming `<section>.skip_layers` (and `where`) when an index is past a network of `depth` blocks:
        checked where the depth is known (training's config, the sweep's trials)."""
        try:
            check_skip_layers(self.skip_layers, depth)
        except ValueError as error:
            raise ValueError(f"{getattr(self, 'SECTION', type(self).__name__)}.{error}{where}") from None


def validate(config: object) -> None:
    """Re-run the checks of a config made or changed in code (the sweep's trials, tests): each nested dataclass's
    `__post_init__`, and each enum field's value against its enum. Configs composed by Hydra are checked already."""
    import typing
    from dataclasses import fields, is_dataclass
    from enum import Enum

    hints = typing.get_type_hints(type(config))
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        kind = hints.get(f.name)
        if isinstance(kind, type) and issubclass(kind, Enum) and not isinstance(value, kind):
            try:
                setattr(config, f.name, kind(value))
            except ValueError:
                section = getattr(config, "SECTION", type(config).__name__)
                raise ValueError(f"{section}.{f.name} must be one of {[m.value for m in kind]}, "
                                 f"got {value!r}") from None
        if is_dataclass(value):
            validate(value)
    post_init = getattr(config, "__post_init__", None)
    if post_init is not None:
        post_init()

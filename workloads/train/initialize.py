"""Where a run's first weights come from: `init_from=` names a previous run (its `export/`) or a diffusers
`SD3Transformer2DModel` folder, local or in object storage."""

from __future__ import annotations

import tempfile

from model import MMDiT
from model.interop import load_diffusers
from pipelines.storage import Location
from workloads.runtime import logger

LOG = logger("train")


def init_source(init_from: Location, name: str = "init_from") -> Location:
    """The diffusers folder behind a run or model argument (`name`, as the command line spells it): a run folder's
    `export/`, or the folder itself."""
    for candidate in (init_from.child("export"), init_from):
        if candidate.exists("config.json"):
            return candidate
    raise FileNotFoundError(f"{name}={init_from.uri!r} has neither export/config.json (a finished run) nor "
                            "config.json (a diffusers SD3Transformer2DModel folder)")


def weight_loader(init_from: Location | str):
    """A function that copies the previous stage's (EMA) weights into a freshly built network."""
    init_from = Location.of(init_from)

    def load(net: MMDiT) -> None:
        source = init_source(init_from)
        with tempfile.TemporaryDirectory() as tmp:
            local = source.root
            if source.remote:
                source.fs.get(source.root.rstrip("/") + "/", tmp + "/", recursive=True)
                local = tmp
            previous = load_diffusers(local, config=net.config)  # a muP run reads it back as muP
        net.load_state_dict(previous.state_dict(), strict=True)
        LOG.info(f"initialised from {source}")

    return load

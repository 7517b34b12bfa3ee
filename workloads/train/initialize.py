"""Where a run's first weights come from: `init_from=` names a previous run (its `export/`) or a diffusers
`SD3Transformer2DModel` folder, local or in object storage."""

from __future__ import annotations

import tempfile

from model import MMDiT
from model.interop import load_diffusers
from pipelines.storage import filesystem, is_remote, join


def init_source(init_from: str, endpoint_url: str | None = None) -> str:
    """The diffusers folder behind `init_from`: a run folder's `export/`, or the folder itself."""
    fs, path = filesystem(init_from, endpoint_url)
    for candidate in (join(path, "export"), path):
        if fs.exists(join(candidate, "config.json")):
            return join(init_from, "export") if candidate != path else init_from
    raise FileNotFoundError(f"init_from={init_from!r} has neither export/config.json (a finished run) nor "
                            "config.json (a diffusers SD3Transformer2DModel folder)")


def weight_loader(init_from: str, endpoint_url: str | None):
    """A function that copies the previous stage's (EMA) weights into a freshly built network."""
    def load(net: MMDiT) -> None:
        source = init_source(init_from, endpoint_url)
        with tempfile.TemporaryDirectory() as tmp:
            if is_remote(source):
                fs, path = filesystem(source, endpoint_url)
                fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
                source = tmp
            previous = load_diffusers(source)
        net.load_state_dict(previous.state_dict(), strict=True)
        print(f"[train] initialised from {source}", flush=True)

    return load

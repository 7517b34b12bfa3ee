"""Models published as TorchScript files (the FID Inception, SSCD, scripted score predictors), loaded by path."""

from __future__ import annotations

import io
import warnings

import torch

from pipelines.storage import Location


def load_torchscript(path: Location | str, field: str, what: str,
                     device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript model file (local or s3://) in eval mode; errors name the config `field` and `what` it holds."""
    location = Location.of(path)
    if not location.fs.isfile(location.root):
        raise FileNotFoundError(f"{field}={location.uri}: no such file ({what}; nothing is downloaded during a run)")
    data = io.BytesIO(location.fs.cat_file(location.root))
    try:
        with warnings.catch_warnings():  # deprecated in torch 2.13, yet the format these models are published in
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            return torch.jit.load(data, map_location=device).eval()
    except RuntimeError:
        raise ValueError(f"{field}={location.uri}: not a TorchScript file ({what})") from None

"""Pure-PyTorch core: the MM-DiT, rectified-flow math, text conditioning and SD3 weight interop.

Imports no Ray, DeepSpeed, object-storage or logging back end; `workloads/` applies distribution from outside.
"""

from model import interop
from model.config import FLAVORS, MMDiTConfig, get_flavor
from model.flops import count_params, train_flops
from model.mmdit import MMDiT, MMDiTBlock

__all__ = ["FLAVORS", "MMDiT", "MMDiTBlock", "MMDiTConfig", "count_params", "get_flavor", "interop", "train_flops"]

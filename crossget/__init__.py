"""crossget: CrossGET token merging for Hugging Face vision-language transformers.

    import crossget
    crossget.patch(model, r=16)            # or flops=0.58, method="tome", keep=64 (LLaVA)
    crossget.config(model)                 # the resolved PatchConfig
    crossget.calibrate(model, images, flops=0.58)  # per-layer r chosen on data
    crossget.unpatch(model)
"""

from crossget.api import (
    adapt_processor,
    config,
    cross_token_loss,
    image_tokens,
    is_patched,
    joint_projection,
    patch,
    patch_from_config,
    sources,
    states,
    tokens_per_layer,
    unpatch,
)
from crossget.calibration import calibrate
from crossget.config import METHODS, PatchConfig
from crossget.io import apply, load_cross_tokens, save_cross_tokens
from crossget.loss import cross_token_alignment
from crossget.merge import Merge
from crossget.methods.crossget import complete_graph_soft_matching
from crossget.methods.tome import bipartite_soft_matching

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Merge",
    "PatchConfig",
    "adapt_processor",
    "apply",
    "bipartite_soft_matching",
    "calibrate",
    "complete_graph_soft_matching",
    "config",
    "cross_token_alignment",
    "cross_token_loss",
    "image_tokens",
    "is_patched",
    "joint_projection",
    "load_cross_tokens",
    "patch",
    "patch_from_config",
    "save_cross_tokens",
    "sources",
    "states",
    "tokens_per_layer",
    "unpatch",
]

"""crossget: CrossGET token merging for Hugging Face vision-language transformers.

    import crossget
    crossget.patch(model, r=16)            # or flops=0.58, method="tome"
    crossget.unpatch(model)
"""

from crossget.api import config, is_patched, patch, sources, states, tokens_per_layer, unpatch
from crossget.families.llava import adapt_processor, image_tokens
from crossget.io import load_cross_tokens, save_cross_tokens
from crossget.loss import cross_token_alignment, cross_token_loss
from crossget.merge import Merge, bipartite_soft_matching, complete_graph_soft_matching

__version__ = "0.1.0"

__all__ = [
    "Merge",
    "adapt_processor",
    "bipartite_soft_matching",
    "complete_graph_soft_matching",
    "config",
    "cross_token_alignment",
    "cross_token_loss",
    "image_tokens",
    "is_patched",
    "load_cross_tokens",
    "patch",
    "save_cross_tokens",
    "sources",
    "states",
    "tokens_per_layer",
    "unpatch",
]

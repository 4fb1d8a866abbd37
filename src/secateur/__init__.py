"""secateur: prune PyTorch models.

The public surface is small; see README.md. Importing secateur has no side effects."""
from secateur.criteria import Criterion, Magnitude, Random, Scores, Taylor, register_criterion
from secateur.errors import PruningError
from secateur.masks import apply_masks, finalize, get_mask, is_pruned, masks_of, set_mask
from secateur.patterns import NM, Block, Element, Slices
from secateur.prune import prune
from secateur.io import export_onnx, load, save
from secateur.report import Report, report
from secateur.sensitivity import allocate, sensitivity
from secateur.structured import (DepthResult, FastestResult, StructuredResult, drop_blocks, droppable_blocks,
                                 plan_channels, prune_channels, prune_fastest)
from secateur.llm import prune_llm

__version__ = "0.1.0"

__all__ = [
    "PruningError", "prune", "finalize", "is_pruned", "masks_of", "apply_masks", "get_mask", "set_mask",
    "Criterion", "Magnitude", "Random", "Scores", "Taylor", "register_criterion",
    "Element", "NM", "Block", "Slices", "__version__",
    "save", "load", "export_onnx", "report", "Report", "sensitivity", "allocate",
    "prune_channels", "plan_channels", "StructuredResult", "drop_blocks", "droppable_blocks", "DepthResult",
    "prune_fastest", "FastestResult", "prune_llm",
]

"""One-shot pruning of transformers and LLMs: layer-wise calibration with magnitude, Wanda or SparseGPT."""
from secateur.llm.methods import METHODS, Method, register_method
from secateur.llm.offload import empty_model, load_pruned
from secateur.llm.oneshot import LLMReport, LayerResult, prune_llm

__all__ = ["prune_llm", "LLMReport", "LayerResult", "METHODS", "Method", "register_method", "empty_model",
           "load_pruned"]

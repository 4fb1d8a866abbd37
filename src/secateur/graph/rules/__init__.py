"""Per-ATen-op channel rules: a registry keyed by op (overload packet), plus the op tags torch provides.

Each rule reads the labels of its inputs and sets the labels of its outputs, unioning atoms that must be removed
together. One module per family: identity copies and pointwise ops (``elementwise``), pure data movement (view,
permute, cat, split, index...: the same op is run on the int64 labels, which gives an exact index map,
``movement``), reductions and per-channel spatial ops (``reductions``), matmuls (``matmul``), fused attention
(``attention``), normalisations (``norms``), convolutions / embeddings reached at op level (``weighted``), detection
ops (``detection``), writes at indexed positions (``scatter``); in-place writes through views map into their base's
labels (``inplace``, called by ``dispatch``). ``dispatch.apply_rule`` picks the rule. Ops that only read a shape produce unlabelled
tensors; an op with no rule that reads channels keeps them (``registry.not_understood``, noted)."""
# importing the family modules registers their rules
from secateur.graph.rules import (attention, detection, elementwise, matmul, movement, norms,  # noqa: F401
                                  reductions, scatter, weighted)
from secateur.graph.rules.dispatch import apply_rule
from secateur.graph.rules.registry import BY_NAME, RULES, _pad, aten, rule

__all__ = ["BY_NAME", "RULES", "apply_rule", "aten", "rule", "_pad"]

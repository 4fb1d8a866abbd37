"""Importance criteria for the masking engine: higher score = more important = kept longer.

A criterion turns a tensor into element scores of the same shape (float32, on the tensor's device).
Patterns that remove groups (blocks, rows) combine element scores with an L-``p`` norm, so that
``Magnitude(p=2)`` with rows gives exactly ``ln_structured(n=2)``.

Extension point: subclass `Criterion` (override ``score``, optionally ``group_scores``) or pass any
function ``(tensor, name) -> scores``; `register_criterion` makes it available by name."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

import torch

from secateur.errors import fail


class Criterion:
    """Subclass this to prune by your own importance measure: override ``score(tensor, name)`` (higher =
    kept longer) and, for a custom group rule, ``group_scores``. ``p`` is the norm that combines element
    scores into group scores (blocks, rows)."""

    p: float = 1.0

    def score(self, tensor: torch.Tensor, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def group_scores(self, tensor: torch.Tensor, name: str, pattern) -> torch.Tensor:
        """Scores per group of ``pattern``; by default the L-p norm of the element scores."""
        return pattern.reduce(self.score(tensor, name), self.p)


@dataclass(frozen=True)
class Magnitude(Criterion):
    """|w|; groups are ranked by their L-p norm (p=1: L1, p=2: L2, any p > 0, or inf).

    The default and the baseline: needs no data or gradients, and is what most tutorials and
    ``torch.nn.utils.prune`` use."""

    p: float = 1.0

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) or not (self.p > 0):
            raise fail("magnitude norm order must be a number > 0", where="Magnitude", value=self.p)

    def score(self, tensor, name):
        return tensor.detach().abs().float()


@dataclass(frozen=True)
class Random(Criterion):
    """Seeded random scores. Element scores are ``-rand`` so that, like ``torch.nn.utils.prune``'s
    ``random_unstructured``, the entries with the *largest* draws go first; group scores are ``rand``
    per group, like ``random_structured``. With the same seed both give torch's masks.

    Use it as the control in experiments: a criterion that does not beat random pruning is not helping."""

    seed: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise fail("Random needs an integer seed", where="Random", value=self.seed)

    def _draw(self, shape, device):
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return torch.rand(shape, generator=g, device=device)

    def score(self, tensor, name):
        return -self._draw(tensor.shape, tensor.device)

    def group_scores(self, tensor, name, pattern):
        if pattern.is_elementwise:
            return self.score(tensor, name)
        return self._draw(pattern.group_shape(tensor.shape), tensor.device)


@dataclass(frozen=True)
class Taylor(Criterion):
    """First-order Taylor importance |w * dL/dw|, from the gradient already in ``.grad``
    (call ``loss.backward()`` on a batch first). Use it when a batch of real data is at hand: it
    estimates each weight's effect on the loss, which magnitude alone cannot."""

    def score(self, tensor, name):
        if tensor.grad is None:
            raise fail("Taylor criterion needs a gradient; run loss.backward() before pruning", where=name,
                       shape=tensor.shape)
        return (tensor.detach() * tensor.grad).abs().float()


@dataclass(frozen=True)
class Scores(Criterion):
    """Scores supplied by the caller, keyed by tensor name (``"fc1.weight"``).

    Use it when importance comes from elsewhere (accumulated gradients, a saliency method, another
    tool): secateur then only does the selection, patterns and masking."""

    scores: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def score(self, tensor, name):
        if name not in self.scores:
            raise fail("no score supplied for this tensor", where=name, shape=tensor.shape,
                       hint=f"known keys: {sorted(self.scores)[:8]}")
        s = self.scores[name]
        if tuple(s.shape) != tuple(tensor.shape):
            raise fail(f"score shape {tuple(s.shape)} does not match the tensor", where=name, shape=tensor.shape)
        return s.detach().to(device=tensor.device, dtype=torch.float32)


@dataclass(frozen=True)
class FunctionCriterion(Criterion):
    """Wraps a user function ``(tensor, name) -> scores``."""

    fn: Callable[[torch.Tensor, str], torch.Tensor] = None  # type: ignore[assignment]
    p: float = 1.0

    def score(self, tensor, name):
        s = self.fn(tensor.detach(), name)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(tensor.shape):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise fail(f"criterion function returned {got}, expected scores of the tensor's shape",
                       where=name, shape=tensor.shape)
        return s.float()


_REGISTRY: dict[str, Callable[[], Criterion]] = {
    "l1": lambda: Magnitude(1.0),
    "magnitude": lambda: Magnitude(1.0),
    "l2": lambda: Magnitude(2.0),
    "random": lambda: Random(0),
    "taylor": lambda: Taylor(),
}

CriterionSpec = Union[str, Criterion, Callable[[torch.Tensor, str], torch.Tensor]]


def register_criterion(name: str, factory: Callable[[], Criterion]) -> None:
    """Make ``factory()`` available as ``criterion=name``, so that a custom `Criterion` can be chosen
    by name from configs and the command line like the built-in ones."""
    _REGISTRY[name] = factory


def get_criterion(spec: CriterionSpec) -> Criterion:
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise fail("unknown criterion", value=spec, hint=f"choose one of {sorted(_REGISTRY)}")
        return _REGISTRY[spec]()
    if callable(spec):
        return FunctionCriterion(spec)
    raise fail("criterion must be a name, a Criterion or a function", value=spec)

"""Forward passes that leave the model's state alone.

Why: planning, scoring, dry runs and timing all run the model, and a model in training mode updates its
BatchNorm running statistics on every forward, from the example inputs, which are not training data. A call
that only looks at a model (``plan_channels``), or one that then raises, would hand back a changed model.
Switching to eval mode is not the answer for planning: a model can run other modules in training mode
(torchvision GoogLeNet's and Inception's auxiliary classifiers), and a plan made without them breaks the
model's training forward. So the model keeps its mode, and the norms stop *tracking* for the duration: in
training mode a BatchNorm that does not track normalises by the batch's statistics, exactly as it does when
it tracks, and writes nothing."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["statistics_kept", "keeps_statistics"]


@contextlib.contextmanager
def statistics_kept(model: nn.Module, *, eval: bool = False) -> Iterator[nn.Module]:
    """No running statistic of ``model`` changes inside (and with ``eval``, every module in eval mode). Modes
    and flags come back by module *name*, so a caller that swaps modules in (a pruned copy's, a ``Skipped``
    block) leaves them as the original's were; a new module takes its parent's mode."""
    was: dict[str, tuple[bool, bool | None]] = {}
    for name, m in model.named_modules():
        tracks = m.track_running_stats if isinstance(m, _NormBase) else None
        was[name] = (m.training, tracks)
        if tracks and m.training:
            m.track_running_stats = False
    if eval:
        model.eval()
    try:
        yield model
    finally:
        modes: dict[str, bool] = {}
        for name, m in model.named_modules():  # parents come before their children
            training, tracks = was.get(name, (modes.get(name.rpartition(".")[0], was[""][0]), None))
            m.training = modes[name] = training
            if isinstance(m, _NormBase):  # a norm that was not there before tracks if it holds statistics
                m.track_running_stats = tracks if tracks is not None else m.running_mean is not None


def keeps_statistics(fn: Callable | None = None, *, eval: bool = False) -> Callable:
    """`statistics_kept` around a function whose first argument is the model (left alone when it is not an
    ``nn.Module``: the function's own check names the bad value)."""
    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(model, nn.Module):
                return f(model, *args, **kwargs)
            with statistics_kept(model, eval=eval):
                return f(model, *args, **kwargs)
        return wrapper
    return wrap(fn) if fn is not None else wrap

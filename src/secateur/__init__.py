"""secateur: prune PyTorch models.

The public surface is small; see README.md. Importing secateur has no side effects."""
from secateur.errors import PruningError

__version__ = "0.1.0"

__all__ = ["PruningError", "__version__"]

"""Callbacks that run a secateur pruning schedule inside other training loops.

``secateur.integrations.hf.PruningCallback`` (Hugging Face ``Trainer``) and
``secateur.integrations.lightning.PruningCallback`` (PyTorch Lightning). Each module imports its framework,
so import the one you use; this package itself imports nothing."""

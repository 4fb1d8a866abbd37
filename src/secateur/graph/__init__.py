"""Structural dependency graph: capture (capture.py), per-op rules (rules/), leaf modules (modules.py),
groups (groups.py). ``build_groups(model, example_inputs)`` is the entry point."""
from secateur.graph.groups import Graph, Group, Member, build_graph, build_groups

__all__ = ["Graph", "Group", "Member", "build_graph", "build_groups"]

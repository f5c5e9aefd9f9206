"""Decisions over data: which recipients are ours, who may relay."""

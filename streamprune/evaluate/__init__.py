"""Evaluation of (pruned) checkpoints with the same block streaming as pruning."""

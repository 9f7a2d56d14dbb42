"""Evaluation: metrics (registered as plugins) and the held-out evaluation loop."""

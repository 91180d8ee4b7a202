"""PyTorch plumbing: persistence, distributed setup, statistics, misc helpers."""

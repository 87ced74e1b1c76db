"""Scaling laws for quantized training: the laws, fitting them to runs, their plots, and the sweep
that produces the runs. Knows formats only (no Lightning at import time)."""

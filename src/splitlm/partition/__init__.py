"""Profiler, cost models, search, and the Plan."""

from splitlm.partition.plan import CodecConfig, Plan, Predictions, WeightQuant

__all__ = ["CodecConfig", "Plan", "Predictions", "WeightQuant"]

"""Profiler, cost models, search, and the Plan."""

from splitlm.partition.plan import Plan, Predictions
from splitlm.quantize.config import CodecConfig, WeightQuant

__all__ = ["CodecConfig", "Plan", "Predictions", "WeightQuant"]

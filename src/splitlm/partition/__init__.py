"""The Plan, the profile, cost models and search (torch-free); the measuring is in splitlm.profiler."""

from splitlm.partition.plan import Plan, Predictions
from splitlm.quantize.config import CodecConfig, WeightQuant

__all__ = ["CodecConfig", "Plan", "Predictions", "WeightQuant"]

"""`splitlm profile`: measuring a model's device head, cloud tail, link, memory and quality
into a Profile (partition.profile) that the partitioner searches."""

from splitlm.profiler.measure import measure_peak_rss, measure_profile, probe_rtt_ms, write_partial

__all__ = ["measure_peak_rss", "measure_profile", "probe_rtt_ms", "write_partial"]

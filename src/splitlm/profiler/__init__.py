"""`splitlm profile`: measure a Profile (the device's half torch-free, the cloud's half with torch).

Everything the partitioner prices is measured on the components that run it:

* the calibration kit (`kit`, exported where torch is): heads of `probe_layers` layers per weight
  precision and KV width, an embedding-only head, calibration heads of two depths, a device-only head,
  the device LM-head graphs, calibration text and activations.
* the device's half (`device`, torch-free, on the device): each kit head timed in the onnxruntime
  runtime (decode at several contexts, prefill at two chunk sizes), per-layer cost the difference to the
  embedding-only head; peak RSS of fresh device processes (`python -m splitlm.device.probe`) for the
  runtime, each head at two lengths and heads of two depths, through which memory is fitted; what a
  quantized cache adds to a step; the calibration heads stepped as a split session steps them (waiting
  for the cloud between steps) and their first call in a fresh process; the device-only head stepped as
  `generate` steps it; each codec point's encoder; the link (RTT probed against a running server).
* the cloud's half (`cloud`, with torch, where the cloud runs): tail stages of `cloud_probe_layers`
  timed in torch; real split sessions against a real `splitlm serve` of the calibration exports over
  loopback, whose waits less the modelled costs give the service's own costs; each codec point's size and
  decoder; the quality table (perplexity on calibration windows per precision, KV width and codec point;
  cached: it does not depend on the machine).
* `partition.profile.merge` makes one Profile of the halves.

`run.measure_profile` does it all on one machine; `run.measure_cloud_half` (which writes the kit) and
`run.measure_device_half` do it on two.
"""

from __future__ import annotations

import importlib

_LAZY = {"ProfileConfig": "splitlm.profiler.config", "measure_profile": "splitlm.profiler.run",
         "measure_cloud_half": "splitlm.profiler.run", "measure_device_half": "splitlm.profiler.device",
         "write_partial": "splitlm.profiler.report", "fit_memory": "splitlm.profiler.device",
         "measure_peak_rss": "splitlm.profiler.probes", "probe_rtt_ms": "splitlm.device.client"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """The names above, imported when first used: the device's half imports no torch."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'splitlm.profiler' has no attribute {name!r}")

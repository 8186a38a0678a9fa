"""`splitlm profile`: measure a Profile on this machine (needs torch for export and the cloud side).

Everything the partitioner prices is measured on the components that run it:

* device latency: heads of `probe_layers` layers exported per weight precision and timed in the
  onnxruntime runtime (decode at several contexts, prefill at two chunk sizes); per-layer cost is
  the difference to an embedding-only head, divided by the layer count. The device LM head
  (device-only plans) is its own exported graph, timed the same way.
* device memory: peak RSS of fresh device processes (the runtime alone; the embedding-only head;
  each precision's head; each KV width at two sequence lengths; heads of two depths at two
  lengths, through which memory is fitted) driven with real text, so what onnxruntime maps,
  prepacks and allocates is counted as it happens.
* device KV: the same head with each KV width, timed: what quantizing the cache adds per layer
  at each context and per prefill position.
* cloud latency: tail stages of `cloud_probe_layers` (default twice `probe_layers`) timed in torch.
* what per-layer costs miss (runtime calls and buffers on a fresh device session, gRPC, the
  service's own work): real split sessions at two depths against a real `splitlm serve` over
  loopback, device time and waiting time measured apart, less the modelled costs and the loopback
  RTT; a device-only export stepped as `generate` steps it.
* codec: each point encoded/decoded on real activations at the middle layer.
* link: the given bandwidth; the RTT given, or probed against a running server (also alone:
  `splitlm profile --link-only`).
* quality: perplexity on calibration windows for each precision at a few split points, each KV
  width and codec point (cached: it does not depend on the machine).

The phases, one function each, returning typed results: `device` (heads per weight precision and KV
width, the device LM head), `cloud` (tail stages, the cloud LM head, codec points), `calibration`
(split sessions against a real server; the link's RTT), `memory` (the device memory surface),
`quality` (cached); `run.measure_profile` sequences them under a `ProfileConfig`. The device
processes are `python -m splitlm.device.probe` (`probes`).
"""

from splitlm.profiler.calibration import probe_rtt_ms
from splitlm.profiler.config import ProfileConfig
from splitlm.profiler.memory import fit_memory
from splitlm.profiler.probes import measure_peak_rss
from splitlm.profiler.run import measure_profile, write_partial

__all__ = ["ProfileConfig", "fit_memory", "measure_peak_rss", "measure_profile", "probe_rtt_ms", "write_partial"]

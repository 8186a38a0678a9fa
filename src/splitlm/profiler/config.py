"""What a profile measures (`ProfileConfig`), what every phase shares (`Bench`), and the calibration kit
that the device's half is measured on (`export_kit`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from splitlm import evaluate
from splitlm.errors import ConfigError
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.spec import ModelSpec
from splitlm.partition.plan import Plan
from splitlm.profiler.kit import SHORT_PREFILL, Kit
from splitlm.quantize.config import DEFAULT_GROUP, KV_BITS, LM_HEAD_BITS, WEIGHT_BITS, CodecConfig, WeightQuant


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """What `measure_profile` measures, and how hard."""

    bits: tuple[int, ...] = (16, 8, 4)
    """Weight precisions timed on both sides (and priced in the quality table)."""
    kv_bits: tuple[int, ...] = (16, 8, 4)
    """Device KV cache precisions (16 is always measured: the reference the others are priced against)."""
    contexts: tuple[int, ...] = (128, 512, 1024)
    """Contexts at which a decode step is timed."""
    probe_layers: int = 4
    """Layers of the device heads that are timed (per-layer cost: the difference to an embedding-only head)."""
    prefill: int = 128
    """The plan's prefill chunk: the longer of the two prefill calls timed (the shorter is SHORT_PREFILL)."""
    cloud_probe_layers: int | None = None
    """Layers of the cloud stages that are timed (default twice probe_layers)."""
    memory_positions: int = 1024
    """The longer of the two sequence lengths at which device memory is measured."""
    quality_windows: int = 2
    """Calibration windows the quality table is measured on."""
    threads: int | None = None
    """onnxruntime threads (None: all cores)."""
    reps: int = 7
    """Timing repetitions (the median is kept)."""
    server: str | None = None
    """HOST:PORT of a running `splitlm serve`: the link's RTT is probed against it (else the given link's is kept)."""
    lm_head_bits: tuple[int, ...] = (16, 8)
    """Device LM head precisions (device-only plans)."""

    def __post_init__(self) -> None:
        for name, values, allowed in (("bits", self.bits, WEIGHT_BITS), ("kv_bits", self.kv_bits, KV_BITS),
                                      ("lm_head_bits", self.lm_head_bits, LM_HEAD_BITS)):
            if not values or not set(values) <= set(allowed):
                raise ConfigError(f"ProfileConfig.{name} {values!r}: give one or more of {allowed}")
        if not self.contexts or min(self.contexts) < 1:
            raise ConfigError(f"ProfileConfig.contexts {self.contexts!r}: give one or more positive contexts")
        if self.prefill <= SHORT_PREFILL:
            raise ConfigError(f"ProfileConfig.prefill {self.prefill}: must be > {SHORT_PREFILL} (the short prefill timed beside it)")
        for name in ("probe_layers", "cloud_probe_layers", "memory_positions", "quality_windows", "threads", "reps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"ProfileConfig.{name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every phase of one profile shares: the model, the config, calibration text, a scratch
    directory and the plan that every probe head is exported from."""

    ckpt: Checkpoint
    config: ProfileConfig
    tmp: Path
    """Where the kit is exported (a scratch directory for a one-machine profile)."""
    windows: list[list[int]]
    """Calibration windows (the quality table uses the last `quality_windows`)."""
    text: list[int]
    """The windows' token ids, concatenated: what the probes are driven with."""
    n: int
    """Layers of the device probe heads: probe_layers, at most the model's."""
    lo: int
    """The shorter sequence length at which memory is measured (just past one prefill chunk)."""
    hi: int
    """The longer one."""
    base_plan: Plan
    """Split at 0, fp16 codec, long enough for every probe: the probe heads are this plan, replaced."""

    @property
    def spec(self) -> ModelSpec:
        return self.ckpt.spec

    @property
    def layers(self) -> int:
        return self.ckpt.spec.num_layers

    @property
    def sizes(self) -> tuple[int, int]:
        """The two prefill calls timed: SHORT_PREFILL and the plan's chunk."""
        return (SHORT_PREFILL, self.config.prefill)

    def probe_plan(self, split: int, bits: int, **changes) -> Plan:
        """The base plan split at `split` with device weights at `bits` (cloud weights and the rest in `changes`)."""
        from splitlm.quantize.apply import preferred_method

        method = preferred_method(self.ckpt, bits)
        return self.base_plan.replace(split_layer=split, device_weights=WeightQuant(bits, DEFAULT_GROUP, method), **changes)


def prepare(ckpt: Checkpoint, config: ProfileConfig, tmp: Path) -> Bench:
    """The calibration text, probe sizes and base plan of a profile of `ckpt`."""
    c = config
    tok = ckpt.tokenizer()
    windows = evaluate.calibration_windows(tok, max(2, c.quality_windows, -(-(max(c.contexts) + 2 * c.reps + 16) // evaluate.WINDOW)))
    lo, hi = c.prefill + 1, max(c.memory_positions, c.prefill + 2)
    base_plan = Plan(ckpt.model_id, ckpt.weights_hash, 0, codec=CodecConfig("fp16"),
                     max_seq_len=max(hi, max(c.contexts) + 2 * c.reps + 16) + 8, prefill_chunk=c.prefill)
    return Bench(ckpt, config, tmp, windows, [t for w in windows for t in w], min(c.probe_layers, ckpt.spec.num_layers),
                 lo, hi, base_plan)


def calibration_cloud_bits(bench: Bench) -> int:
    """The cloud precision of the calibration exports: 16-bit where it is profiled."""
    return 16 if 16 in bench.config.bits else max(bench.config.bits)


def calibration_depths(bench: Bench) -> list[int]:
    """The device depths of the calibration sessions: the probe heads' (less one where that leaves the
    cloud nothing) and, where it differs, all but two layers."""
    L, k = bench.layers, min(bench.n, bench.layers - 1)
    return [k] + ([L - 2] if L - 2 > k else [])


def calibration_root(bench: Bench, depth: int) -> Path:
    """The export of the calibration head of `depth` device layers, served by the cloud's loopback
    calibration (the KV phase's 16-bit head where it is the same plan)."""
    same = depth == bench.n and calibration_cloud_bits(bench) == 16
    return bench.tmp / "kv16" if same else bench.tmp / f"calibration{depth}"


def kit_of(bench: Bench) -> Kit:
    """The kit that export_kit writes for `bench`, in bench.tmp."""
    c, spec = bench.config, bench.spec
    return Kit(bench.ckpt.model_id, bench.ckpt.weights_hash, spec.num_layers, spec.hidden_size, spec.vocab_size,
               spec.max_position, bench.n, bench.lo, bench.hi, tuple(c.contexts), c.prefill, tuple(c.bits),
               tuple(sorted(set(c.kv_bits) | {16}, reverse=True)), tuple(c.lm_head_bits), tuple(calibration_depths(bench)),
               c.reps, c.threads, bench.tmp)


def export_kit(bench: Bench, progress: bool = True) -> Kit:
    """Export every probe head of the device's half into bench.tmp, and the calibration text and
    activations: the calibration kit (profiler.kit). Calibration heads keep their cloud/ folders (the
    cloud's loopback calibration serves them)."""
    from tqdm import tqdm

    from splitlm.export import export_artifacts
    from splitlm.profiler.device import alone_lm_head_bits
    from splitlm.stages import build_stages

    kit = kit_of(bench)
    n, cloud = bench.n, WeightQuant(calibration_cloud_bits(bench), DEFAULT_GROUP)
    jobs = [("base", bench.base_plan)] + [(f"kv{kb}", bench.probe_plan(n, 8, kv_bits=kb)) for kb in kit.kv_bits]
    jobs += [(f"w{b}", bench.probe_plan(n, b)) for b in kit.bits if b != 8]  # 8: the kv16 head
    jobs += [(calibration_root(bench, d).name, bench.probe_plan(d, 8, cloud_weights=cloud)) for d in kit.depths
             if calibration_root(bench, d).name != "kv16"]
    jobs.append(("alone", bench.probe_plan(bench.layers, 8, lm_head_bits=alone_lm_head_bits(kit.lm_head_bits))))
    for name, plan in tqdm(jobs, desc="calibration kit", disable=not progress, leave=False):
        export_artifacts(bench.ckpt, plan, bench.tmp / name, progress=False)
    for hb in kit.lm_head_bits:
        _export_lm_head(bench.ckpt, hb, kit.lm_graph(hb))
    L = bench.layers
    mid, _ = build_stages(bench.ckpt, Plan(bench.ckpt.model_id, bench.ckpt.weights_hash, L // 2), tail=False)
    import torch

    with torch.inference_mode():  # what the codec points are timed and sized on, and their basis fitted on
        h = np.concatenate([mid(torch.tensor([w]))[0].numpy() for w in bench.windows[:4]])
    kit.save(bench.text, h)
    return kit


def _export_lm_head(ckpt: Checkpoint, bits: int, path: Path) -> None:
    """An ONNX graph of embedding + final norm + LM head at `bits` (no layers)."""
    from splitlm.export import export_head
    from splitlm.model.load import build_stage
    from splitlm.quantize.apply import quantize_lm_head

    path.parent.mkdir(parents=True, exist_ok=True)
    export_head(quantize_lm_head(build_stage(ckpt, 0, 0, embed=True, final=True), bits), path.parent, 1)

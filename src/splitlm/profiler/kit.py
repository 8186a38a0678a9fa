"""The calibration kit (torch-free): the probe heads a device profile runs, exported on the workstation.

`splitlm profile --kit DIR` (the full install) writes DIR; `splitlm profile --device DIR` (the device
install) reads it and measures the device with onnxruntime alone. DIR holds:

* `kit.json`: the model and what to measure (the probe sizes, contexts, precisions, calibration depths);
* `text.txt`: calibration token ids, what every probe is driven with;
* `activations.npy`: real activations at the middle layer, what the codec's encoder is timed on;
* one folder per probe head, each an export's `device/` folder (`<name>/device`), and the device LM-head
  graphs (`lm<bits>/head.onnx`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitlm.errors import ConfigError
from splitlm.partition.fields import MissingField, from_fields
from splitlm.quantize.config import CodecConfig

KIT_VERSION = 1
KIT_FILE = "kit.json"
SHORT_PREFILL = 16
"""The small prefill call that, with the plan's chunk, gives each layer's fixed and per-token prefill cost."""
CODEC_POINTS: dict[str, CodecConfig] = {
    "fp16": CodecConfig("fp16"),
    "tabq eps=0.02": CodecConfig("tabq", error_budget=0.02, entropy="none"),
    "tabq eps=0.035": CodecConfig("tabq", error_budget=0.035, entropy="none"),
    "ans eps=0.02": CodecConfig("tabq", error_budget=0.02, entropy="ans"),
    "ans eps=0.035": CodecConfig("tabq", error_budget=0.035, entropy="ans"),
    "ans eps=0.05": CodecConfig("tabq", error_budget=0.05, entropy="ans"),
}
MEASURED_ROWS = 256
"""The kit's activations: the first MEASURED_ROWS are what the codec points are timed and sized on, the rest
what the ans points' basis is fitted on (as an export fits it on calibration text)."""


def codec_basis(activations: np.ndarray, cfg: CodecConfig):
    """The basis an ans codec point codes the kit's measured rows in (None for the other points)."""
    from splitlm.quantize import ans, codec

    if codec.frame_kind(cfg) != "ans":
        return None
    return ans.Basis.fit(0, activations[MEASURED_ROWS:])


@dataclass(frozen=True)
class Kit:
    """What a device profile measures, and where its probe heads are."""

    model_id: str
    weights_hash: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position: int | None
    n: int
    """Layers of the probe heads (per-layer cost: the difference to the embedding-only head)."""
    lo: int
    """The shorter sequence length at which memory is measured (just past one prefill chunk)."""
    hi: int
    """The longer one."""
    contexts: tuple[int, ...]
    """Contexts at which a decode step is timed."""
    prefill: int
    """The plan's prefill chunk: the longer of the two prefill calls timed."""
    bits: tuple[int, ...]
    kv_bits: tuple[int, ...]
    lm_head_bits: tuple[int, ...]
    depths: tuple[int, ...]
    """Device depths of the calibration heads: the probe heads' and, where the model has it, a deep one."""
    reps: int = 7
    """Timing repetitions (the median is kept)."""
    threads: int | None = dataclasses.field(default=None, compare=False)
    """onnxruntime threads on the machine that measures (not written: the device says)."""
    root: Path = dataclasses.field(default=Path("."), compare=False)
    """The kit's directory (not written)."""

    @property
    def sizes(self) -> tuple[int, int]:
        """The two prefill calls timed: SHORT_PREFILL and the plan's chunk."""
        return (SHORT_PREFILL, self.prefill)

    def head(self, name: str) -> Path:
        """The device folder of probe head `name` (base, kv16, kv8, w4, calibration6, alone...)."""
        return self.root / name / "device"

    def weights_head(self, bits: int) -> Path:
        """The probe head at `bits` weights (8: the 16-bit-KV head, the same plan)."""
        return self.head("kv16" if bits == 8 else f"w{bits}")

    def lm_graph(self, bits: int) -> Path:
        return self.root / f"lm{bits}" / "head.onnx"

    def calibration_head(self, depth: int) -> Path:
        """The calibration head of `depth` device layers (the 8-bit, 16-bit-KV probe head where it is the same;
        only its cloud side may differ, which the device does not hold)."""
        return self.head("kv16" if depth == self.n else f"calibration{depth}")

    @property
    def text(self) -> list[int]:
        return [int(t) for t in (self.root / "text.txt").read_text().split()]

    @property
    def activations(self) -> np.ndarray:
        return np.load(self.root / "activations.npy")

    @property
    def id(self) -> str:
        """What a device profile and a cloud profile of one kit share: a hash of kit.json."""
        return hashlib.sha256(self._json().encode()).hexdigest()[:16]

    def _json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("threads", "root")}
        return json.dumps({"version": KIT_VERSION, **data}, indent=2, sort_keys=True)

    def save(self, text: list[int], activations: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "text.txt").write_text(" ".join(map(str, text)) + "\n")
        np.save(self.root / "activations.npy", np.ascontiguousarray(activations, dtype=np.float32))
        (self.root / KIT_FILE).write_text(self._json() + "\n")

    @classmethod
    def load(cls, root: str | Path, threads: int | None = None, reps: int | None = None) -> "Kit":
        """The kit in directory `root`; ConfigError naming what is missing or wrong."""
        root = Path(root)
        path = root / KIT_FILE
        if not path.is_file():
            raise ConfigError(f"{root} is not a calibration kit (no {KIT_FILE}); write one with "
                              "`splitlm profile --model M --kit DIR` on the full install")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.pop("version", None) != KIT_VERSION:
            raise ConfigError(f"{path}: kit version {raw.get('version') if isinstance(raw, dict) else None!r} is not "
                              f"supported (expected {KIT_VERSION})")
        try:
            kit = from_fields(cls, raw)
        except MissingField as exc:
            raise ConfigError(f"{path} has no field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path} is malformed ({exc})") from None
        kit = dataclasses.replace(kit, root=root, threads=threads, reps=kit.reps if reps is None else reps)
        missing = [p for p in [root / "text.txt", root / "activations.npy", kit.head("base"), kit.head("alone")]
                   + [kit.head(f"kv{kb}") for kb in kit.kv_bits] + [kit.weights_head(b) for b in kit.bits]
                   + [kit.calibration_head(d) for d in kit.depths] + [kit.lm_graph(hb) for hb in kit.lm_head_bits]
                   if not p.exists()]
        if missing:
            raise ConfigError(f"the kit in {root} is incomplete: {missing[0]} is missing")
        return kit

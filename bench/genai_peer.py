"""onnxruntime-genai as a device peer for bench/device.py: its model builder's ONNX of the same
GGUF weights, timed through its own runtime.

    .venv/bin/pip install onnxruntime-genai onnx_ir onnxscript   # bench-only; not in pyproject

The GGUF is dequantized to a Hugging Face directory by transformers (Q4_1 -> fp32), then
`python -m onnxruntime_genai.models.builder -p int4|int8 -e cpu` requantizes it with its defaults
(MatMulNBits, blocks of 32, symmetric, accuracy_level 4 = int8 compute). Both are cached under
$SPLITLM_CACHE/bench-peers; the builder's log lands beside each build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from splitlm.model.checkpoint import cache_root, source_fingerprint

BUILDS: dict[str, tuple[str, list[str]]] = {
    "int4": ("int4", []),
    # algo_config=rtn: with the default algo the tied embedding points at a weight name the int8 head
    # does not have, and the model fails to load (onnxruntime-genai 0.18)
    "int4, int8 LM head": ("int4", ["algo_config=rtn", "matmul_mixed_precision=last_matmul:int8"]),
    "int8": ("int8", []),
}
"""Row label -> (builder --precision, builder --extra_options)."""


def missing() -> str | None:
    """Why the genai rows cannot run here, or None when they can."""
    absent = [name for name in ("onnxruntime_genai", "onnx_ir", "onnxscript", "transformers", "gguf")
              if importlib.util.find_spec(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed: `pip install onnxruntime-genai onnx_ir onnxscript` adds the rows"
    return None


def _peers_root() -> Path:
    return cache_root() / "bench-peers"


def hf_dir(gguf: Path) -> Path:
    """A Hugging Face directory (fp32 safetensors + tokenizer) holding the GGUF's dequantized weights."""
    key = hashlib.sha256(json.dumps(source_fingerprint(gguf), sort_keys=True).encode()).hexdigest()[:12]
    out = _peers_root() / f"{gguf.stem}-hf-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"writing a Hugging Face directory from {gguf.name} ...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are already dequantized; without this save_pretrained refuses a "gguf-quantized" model
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def build(gguf: Path, label: str) -> Path:
    """The cached onnxruntime-genai build of `gguf` for a BUILDS label; RuntimeError naming the log
    when the builder fails."""
    import onnxruntime_genai as og

    precision, extra = BUILDS[label]
    try:
        src = hf_dir(gguf)
    except (OSError, ValueError, ImportError) as e:
        raise RuntimeError(f"transformers could not write a Hugging Face directory from {gguf.name}: {e}") from None
    key = hashlib.sha256(json.dumps([src.name, precision, extra, og.__version__]).encode()).hexdigest()[:12]
    out = _peers_root() / f"genai-{precision}-{key}"
    if (out / "genai_config.json").is_file():
        return out
    print(f"building onnxruntime-genai {label} ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log = _peers_root() / f"{out.name}.log"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(_peers_root() / "builder-cache")]
    if extra:
        cmd += ["--extra_options", *extra]
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (tmp / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai builder failed (exit {done.returncode}); see {log}")
    try:
        og.Model(str(tmp))
    except RuntimeError as e:  # the builder can exit 0 with an invalid graph
        raise RuntimeError(f"onnxruntime-genai builder wrote a model that does not load ({e}); see {log}") from None
    tmp.rename(out)
    return out


class GenaiEngine:
    """One onnxruntime-genai Generator on CPU with `threads` intra-op threads, driven the way
    bench/device.py drives every engine; its KV buffer holds max_length positions."""

    def __init__(self, build_dir: Path, threads: int, max_length: int = 2048) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(build_dir))
        config.clear_providers()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.params = og.GeneratorParams(self.model)
        self.params.set_search_options(max_length=max_length, do_sample=False)
        self.generator = og.Generator(self.model, self.params)

    def reset(self) -> None:
        self.generator.rewind_to(0)

    def feed(self, ids: list[int]) -> None:
        """One forward pass over `ids` appended to the sequence."""
        self.generator.append_tokens(np.asarray([ids], dtype=np.int32))

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (T, V) of every position of `ids` from an empty sequence."""
        self.reset()
        self.feed(ids)
        return self.generator.get_output("logits")[0]

    def greedy_next(self) -> int:
        """Argmax of the last position's logits."""
        return int(np.argmax(self.generator.get_logits()[0, -1]))

"""Converters that write a cache directory: from GGUF, from a Hugging Face directory, or random."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from splitlm.errors import ConfigError, ModelLoadError
from splitlm.model.chat import save_template, template_from_gguf, template_from_hf_dir
from splitlm.model.checkpoint import SOURCE_FILE, SPEC_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from splitlm.model.spec import ARCHITECTURES, ModelSpec, RopeScaling
from splitlm.model.tokenizer import byte_tokenizer, tokenizer_from_gguf

log = logging.getLogger(__name__)

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_tensor_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face name; ModelLoadError for one we do not know."""
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ModelLoadError(f"GGUF tensor {name!r} has no place in a Llama-family model")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary -> half-split rotary)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


GGUF_BLOCK = 32
"""Weights per block of the GGUF formats we carry."""
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def gguf_blocks(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> dict[str, np.ndarray] | None:
    """A GGUF tensor's Q4_0 / Q4_1 / Q8_0 blocks as our group quantization, exactly (None for other kinds):
    codes uint8 (out, in), scales fp16 (out, in/32), zeros uint8 (out, in/32), and mins fp16 for Q4_1.
        Q4_0  w = d·(q − 8)      codes q, zero 8
        Q4_1  w = d·q + m        codes q, zero 0, mins m
        Q8_0  w = d·q, q int8    codes q + 128, zero 128
    A 4-bit block stores element j in the low nibble of byte j and element j + 16 in its high nibble."""
    if kind not in _BLOCK_BYTES:
        return None
    rows, cols = shape
    if cols % GGUF_BLOCK:
        return None
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, cols // GGUF_BLOCK, _BLOCK_BYTES[kind])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    groups = d.shape[1]
    out = {"scales": d}
    if kind == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        out.update(codes=q.astype(np.uint8).reshape(rows, cols), zeros=np.full((rows, groups), 128, np.uint8), bits=8)
        return out
    qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    codes = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(rows, cols)
    out.update(codes=codes, zeros=np.full((rows, groups), 8 if kind == "Q4_0" else 0, np.uint8), bits=4)
    if kind == "Q4_1":
        out["mins"] = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    return out


def _gguf_fields(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a few exotic field types; we do not need them
            continue
    return out


def spec_from_gguf(fields: dict[str, Any], tensor_names: set[str]) -> ModelSpec:
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; splitlm runs llama, mistral and qwen2")
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError("GGUF files with precomputed rope_freqs (Llama 3.1 style) are not supported; load the Hugging Face directory")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    try:
        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        scaling = get("rope.scaling.type")
        rope = RopeScaling()
        if scaling and scaling not in ("none", "default"):
            rope = RopeScaling.from_hf({
                "type": scaling,
                "factor": get("rope.scaling.factor", 1.0),
                "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            })
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eos_ids = {int(eos)} if eos is not None else set()
        eot = fields.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos_ids.add(int(eot))
        return ModelSpec(
            architecture=ARCHITECTURES[arch],
            vocab_size=int(get("vocab_size") or len(fields["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(sorted(eos_ids)),
        )
    except (TypeError, KeyError) as exc:
        raise ModelLoadError(f"GGUF metadata is incomplete: {exc}") from None


def convert_gguf(gguf_path: Path, out: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file into float32 safetensors + tokenizer.json + spec.json."""
    import gguf
    from safetensors.numpy import save_file
    from tqdm import tqdm

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # noqa: BLE001 - gguf raises bare ValueError/struct errors
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file ({exc})") from None
    fields = _gguf_fields(reader)
    names = {t.name for t in reader.tensors}
    spec = spec_from_gguf(fields, names)
    permute = spec.architecture in ("llama", "mistral")
    tensors: dict[str, np.ndarray] = {}
    blocks: dict[str, np.ndarray] = {}
    block_meta: dict[str, str] = {}
    for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor", disable=not progress, leave=False):
        w = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        name = gguf_tensor_name(t.name)
        heads = None
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = spec.num_heads
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = spec.num_kv_heads
        tensors[name] = w if heads is None else unpermute_rotary(w, heads)
        carried = gguf_blocks(t.data, t.tensor_type.name, w.shape) if w.ndim == 2 else None
        if carried is not None:
            bits = carried.pop("bits")
            for part, arr in carried.items():  # the rotary permutation moves whole rows: blocks stay intact
                blocks[f"{name}.{part}"] = np.ascontiguousarray(arr if heads is None else unpermute_rotary(arr, heads))
            block_meta[name] = f"{bits},{GGUF_BLOCK},{t.tensor_type.name}"
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"source": gguf_path.name})
    if blocks:
        save_file(blocks, str(out / SOURCE_FILE), metadata=block_meta)
    tokenizer_from_gguf(fields).save(str(out / TOKENIZER_FILE))
    save_template(template_from_gguf(fields), out)
    (out / SPEC_FILE).write_text(spec.to_json())


def convert_hf_dir(src: Path, out: Path) -> None:
    """Copy a Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json) into the cache."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    config_path = src / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{src} has no config.json")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{src} has no *.safetensors weights (bin/pt checkpoints are not read; convert them to safetensors)")
    if not (src / TOKENIZER_FILE).is_file():
        raise ModelLoadError(f"{src} has no {TOKENIZER_FILE}")
    spec = ModelSpec.from_hf_config(json.loads(config_path.read_text()))
    if len(shards) == 1:
        shutil.copyfile(shards[0], out / WEIGHTS_FILE)
    else:
        merged = {}
        for shard in shards:
            with safe_open(str(shard), framework="numpy") as f:
                for key in f.keys():
                    merged[key] = f.get_tensor(key)
        save_file(merged, str(out / WEIGHTS_FILE))
    shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
    save_template(template_from_hf_dir(src), out)
    (out / SPEC_FILE).write_text(spec.to_json())


def tiny_spec(**overrides: Any) -> ModelSpec:
    """A small Llama-style spec for tests: 4 layers, d=64, GQA 4/2, vocab 288."""
    base = dict(
        architecture="llama", vocab_size=288, hidden_size=64, intermediate_size=160, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position=1024, tie_word_embeddings=True, bos_token_id=None, eos_token_ids=(0,),
    )
    base.update(overrides)
    return ModelSpec(**base)


def random_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with unit-scale activations, under Hugging Face names."""
    rng = np.random.default_rng(seed)
    d, h, kv, hd, i = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size

    def lin(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def vec(n: int, scale: float = 0.1, center: float = 0.0) -> np.ndarray:
        return (center + scale * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((spec.vocab_size, d)).astype(np.float32),
         "model.norm.weight": vec(d, center=1.0)}
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = lin(spec.vocab_size, d)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = vec(d, center=1.0)
        w[p + "post_attention_layernorm.weight"] = vec(d, center=1.0)
        for name, (o, n) in {"q_proj": (h * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, h * hd)}.items():
            w[p + f"self_attn.{name}.weight"] = lin(o, n)
            if (spec.qkv_bias and name != "o_proj") or (spec.o_bias and name == "o_proj"):
                w[p + f"self_attn.{name}.bias"] = vec(o)
        for name, (o, n) in {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}.items():
            w[p + f"mlp.{name}.weight"] = lin(o, n)
            if spec.mlp_bias:
                w[p + f"mlp.{name}.bias"] = vec(o)
    return w


def write_random_hf_dir(spec: ModelSpec, out: Path, seed: int = 0) -> Path:
    """Write a random model as a Hugging Face directory (config.json, safetensors, tokenizer.json)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[spec.architecture]
    config = {
        "architectures": [arch], "model_type": spec.architecture, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta, "max_position_embeddings": spec.max_position,
        "tie_word_embeddings": spec.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": spec.bos_token_id, "eos_token_id": list(spec.eos_token_ids) or None,
        "torch_dtype": "float32",
    }
    if spec.architecture != "qwen2":
        config["attention_bias"] = spec.qkv_bias
        config["mlp_bias"] = spec.mlp_bias
    rs = spec.rope_scaling
    if rs.kind != "default":
        config["rope_scaling"] = {
            "rope_type": rs.kind, "factor": rs.factor, "original_max_position_embeddings": rs.original_max_position,
            "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
            "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(spec, seed), str(out / "model.safetensors"))
    byte_tokenizer().save(str(out / TOKENIZER_FILE))
    return out


def convert_random(spec: ModelSpec, seed: int, out: Path) -> None:
    """Write a random model straight into a cache directory."""
    from safetensors.numpy import save_file

    save_file(random_weights(spec, seed), str(out / WEIGHTS_FILE))
    byte_tokenizer().save(str(out / TOKENIZER_FILE))
    (out / SPEC_FILE).write_text(spec.to_json())

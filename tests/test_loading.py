"""Model loading: the cache, GGUF conversion, and clear errors for bad input."""

import json
import os

import numpy as np
import pytest
import torch

from splitlm.errors import ConfigError, ModelLoadError
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.convert import random_weights, tiny_spec, write_random_hf_dir
from splitlm.model.load import build_stage
from splitlm.model.registry import resolve_model
from splitlm.model.tokenizer import BYTE_SPECIALS, byte_tokenizer


def test_second_load_reads_the_cache(tmp_path):
    src = write_random_hf_dir(tiny_spec(), tmp_path / "m")
    first = resolve_model(src, root=tmp_path / "cache")
    stamp = first.weights_path.stat().st_mtime_ns
    second = resolve_model(src, root=tmp_path / "cache")
    assert second.path == first.path and second.weights_hash == first.weights_hash
    assert second.weights_path.stat().st_mtime_ns == stamp  # not rewritten


@pytest.mark.parametrize("damage", ["garbage", "truncate", "manifest", "spec"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage, caplog):
    src = write_random_hf_dir(tiny_spec(), tmp_path / "m")
    ckpt = resolve_model(src, root=tmp_path / "cache")
    if damage == "garbage":
        with open(ckpt.weights_path, "r+b") as f:
            f.seek(ckpt.weights_path.stat().st_size // 2)
            f.write(b"\xde\xad\xbe\xef" * 64)
    elif damage == "truncate":
        with open(ckpt.weights_path, "r+b") as f:
            f.truncate(1000)
    elif damage == "manifest":
        (ckpt.path / "manifest.json").write_text("{not json")
    else:
        (ckpt.path / "spec.json").unlink()
    with pytest.raises(ModelLoadError):
        Checkpoint.open(ckpt.path)
    again = resolve_model(src, root=tmp_path / "cache")
    assert again.weights_hash == ckpt.weights_hash
    assert "rebuilding" in caplog.text
    build_stage(again)  # loads


def test_changed_source_is_reconverted(tmp_path):
    src = write_random_hf_dir(tiny_spec(), tmp_path / "m", seed=1)
    a = resolve_model(src, root=tmp_path / "cache")
    write_random_hf_dir(tiny_spec(), tmp_path / "m", seed=2)
    b = resolve_model(src, root=tmp_path / "cache")
    assert a.weights_hash != b.weights_hash


def test_directory_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model"):
        resolve_model(tmp_path / "empty", root=tmp_path / "cache")
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        resolve_model(d, root=tmp_path / "cache")


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'gpt-7'.*smollm2-135m"):
        resolve_model("gpt-7", root=tmp_path)


def test_non_gguf_file_and_bad_gguf(tmp_path):
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"hello")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model(txt, root=tmp_path / "cache")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        resolve_model(bad, root=tmp_path / "cache")


def test_wrong_shape_in_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    src = write_random_hf_dir(tiny_spec(), tmp_path / "m")
    w = random_weights(tiny_spec())
    w["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(w, str(src / "model.safetensors"))
    ckpt = resolve_model(src, root=tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="up_proj.weight.*shape"):
        build_stage(ckpt)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: half-split rotary rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, spec, weights, quant=None):
    """A GGUF of `weights`; quant(hf_name) -> a gguf.GGMLQuantizationType (or None) stores a 2-D tensor quantized."""
    gguf = pytest.importorskip("gguf")
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    tok = json.loads(byte_tokenizer().to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<pad{i}>" for i in range(spec.vocab_size - len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in BYTE_SPECIALS else 1 for t in tokens])
    w.add_token_merges([])
    w.add_eos_token_id(0)
    for name, arr in weights.items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            layer, rest = parts[2], ".".join(parts[3:-1])
            gname = f"blk.{layer}.{block[rest]}.{parts[-1]}"
            if rest == "self_attn.q_proj":
                arr = _llama_cpp_permute(arr, spec.num_heads)
            elif rest == "self_attn.k_proj":
                arr = _llama_cpp_permute(arr, spec.num_kv_heads)
        else:
            gname = names[name]
        kind = quant(name) if quant is not None and arr.ndim == 2 else None
        if kind is None:
            w.add_tensor(gname, np.ascontiguousarray(arr))
        else:
            w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(arr), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_conversion_undoes_rotary_permutation(tmp_path, tied):
    spec = tiny_spec(tie_word_embeddings=tied, vocab_size=272)
    weights = random_weights(spec, seed=7)
    write_gguf(tmp_path / "tiny.gguf", spec, weights)
    hf = write_random_hf_dir(spec, tmp_path / "hf", seed=7)
    from_gguf = resolve_model(tmp_path / "tiny.gguf", root=tmp_path / "cache", progress=False)
    from_hf = resolve_model(hf, root=tmp_path / "cache", progress=False)
    assert from_gguf.spec.num_layers == spec.num_layers
    assert from_gguf.spec.tie_word_embeddings == tied
    ids = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = build_stage(from_gguf)(ids), build_stage(from_hf)(ids)
    assert torch.equal(a, b)
    text = "gguf tokenizer <|im_end|> round trip"
    assert from_gguf.tokenizer().encode(text).ids == from_hf.tokenizer().encode(text).ids


def test_model_listing(tmp_path, tiny_ckpt):
    from splitlm.model.registry import list_models

    rows = {r.name: r for r in list_models()}
    assert rows["tiny-random"].status == "cached"
    assert "smollm2-135m" in rows


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_carried_exactly(tmp_path, kind):
    """A GGUF's Q4_0 / Q4_1 / Q8_0 blocks become the "source" method's QuantLinears: their dequantized
    weights equal the converter's float weights bit for bit (q/k rows unpermuted with them), and the
    exported head (MatMulNBits over the same codes, a block-sum term for Q4_1's mins) matches torch."""
    gguf = pytest.importorskip("gguf")
    from splitlm.export import check_parity, export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.apply import LINEARS, preferred_method
    from splitlm.quantize.config import CodecConfig, WeightQuant
    from splitlm.stages import build_stages

    spec = tiny_spec(tie_word_embeddings=True, vocab_size=272)
    qtype = gguf.GGMLQuantizationType[kind]
    write_gguf(tmp_path / "q.gguf", spec, random_weights(spec, seed=3),
               quant=lambda name: qtype if "layers" in name else gguf.GGMLQuantizationType.Q8_0)
    ckpt = resolve_model(tmp_path / "q.gguf", root=tmp_path / "cache", progress=False)
    bits = 8 if kind == "Q8_0" else 4
    assert preferred_method(ckpt, bits) == "source" and preferred_method(ckpt, 12 - bits) == "rtn"
    plan = Plan(ckpt.model_id, ckpt.weights_hash, 2, device_weights=WeightQuant(bits, 32, "source"),
                codec=CodecConfig("fp32"), max_seq_len=64)
    head, _ = build_stages(ckpt, plan, tail=False)
    float_head = build_stage(ckpt, 0, 2)
    for i in range(2):
        for name in LINEARS:
            q = head.model.layers[i].get_submodule(name)
            assert (q.mins is not None) == (kind == "Q4_1")
            assert torch.equal(q.quantized.dequantize(), float_head.model.layers[i].get_submodule(name).weight)
    assert torch.equal(head.model.embed_tokens.quantized.dequantize(), float_head.model.embed_tokens.weight)
    result = export_artifacts(ckpt, plan, tmp_path / "out", progress=False, accuracy_level=0)
    assert max(check_parity(ckpt, plan, result.device_dir, prompts=2).values()) < 1e-4
    with pytest.raises(ConfigError, match=f"not at {12 - bits} bits"):
        build_stages(ckpt, plan.replace(device_weights=WeightQuant(12 - bits, 32, "source")), tail=False)

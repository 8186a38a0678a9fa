"""The reference module against the `transformers` implementation (nothing downloaded)."""

import pytest
import torch

from splitlm.model.convert import tiny_spec, write_random_hf_dir
from splitlm.model.load import build_stage
from splitlm.model.registry import resolve_model
from splitlm.model.spec import RopeScaling
from tests.tolerances import TOL

transformers = pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        return model(ids).logits


CASES = {
    "qwen2-bias-untied": tiny_spec(architecture="qwen2", qkv_bias=True, tie_word_embeddings=False, rope_theta=1e6),
    "llama-tied": tiny_spec(),
    "llama3-rope": tiny_spec(max_position=2048, rope_scaling=RopeScaling("llama3", 8.0, 64, 1.0, 4.0)),
    "linear-rope": tiny_spec(rope_scaling=RopeScaling("linear", 2.0)),
    "yarn-rope": tiny_spec(rope_scaling=RopeScaling("yarn", 4.0, 64)),
    "mha-untied": tiny_spec(num_kv_heads=4, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    spec = CASES[name]
    src = write_random_hf_dir(spec, tmp_path / name, seed=3)
    ckpt = resolve_model(src, progress=False)
    assert ckpt.spec == spec
    ids = torch.randint(0, spec.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(src, ids)
    with torch.inference_mode():
        ours = build_stage(ckpt)(ids)
    assert rel_err(ours, ref) <= TOL["fp32_vs_transformers_rel"]


def test_qwen2_split_equals_transformers(tmp_path):
    from splitlm.local import LocalSplit

    spec = CASES["qwen2-bias-untied"]
    src = write_random_hf_dir(spec, tmp_path / "q", seed=5)
    ckpt = resolve_model(src, progress=False)
    ids = torch.randint(0, spec.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = hf_logits(src, ids)
    got = LocalSplit(ckpt, 2, prefill_chunk=16).forward(ids)
    assert rel_err(got, ref) <= TOL["fp32_vs_transformers_rel"]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm_ckpt):
    from splitlm.model.registry import KNOWN_MODELS

    gguf = KNOWN_MODELS["smollm2-135m"].locate()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = smollm_ckpt.tokenizer()
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is").ids])
    with torch.inference_mode():
        ref = model(ids).logits
        ours = build_stage(smollm_ckpt)(ids)
    assert rel_err(ours, ref) <= TOL["fp32_vs_transformers_rel"]
    assert int(ours[0, -1].argmax()) == int(ref[0, -1].argmax())


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm_ckpt):
    """Equal ids on digit-free text; digits split one by one (llama.cpp's 'smollm' rule, which
    transformers' GGUF conversion leaves out)."""
    import re

    from splitlm.evaluate import protocol_text
    from splitlm.model.registry import KNOWN_MODELS

    gguf = KNOWN_MODELS["smollm2-135m"].locate()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = re.sub(r"[0-9]", "", protocol_text()[:200_000]) + "\n <|im_start|>user\nhi<|im_end|>"
    ours = smollm_ckpt.tokenizer()
    assert ours.encode(text).ids == hf_tok(text).input_ids
    digits = ours.encode("in 2024 and 1999").ids
    assert [ours.id_to_token(i) for i in digits] == ["in", "Ġ", "2", "0", "2", "4", "Ġand", "Ġ", "1", "9", "9", "9"]

import pytest

from splitlm.errors import ConfigError
from splitlm.model.convert import tiny_spec
from splitlm.model.spec import ModelSpec, RopeScaling


def hf_config(**over):
    cfg = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 5e5, "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": [7, 9],
    }
    cfg.update(over)
    return cfg


def test_llama_config_fields():
    spec = ModelSpec.from_hf_config(hf_config())
    assert spec.architecture == "llama"
    assert spec.head_dim == 16 and spec.num_kv_heads == 2
    assert spec.rope_theta == 5e5 and spec.eos_token_ids == (7, 9)
    assert not spec.qkv_bias and not spec.tie_word_embeddings


def test_qwen2_has_qkv_bias_but_no_o_bias():
    spec = ModelSpec.from_hf_config(hf_config(architectures=["Qwen2ForCausalLM"]))
    assert spec.architecture == "qwen2" and spec.qkv_bias and not spec.o_bias


def test_llama3_rope_scaling_is_read():
    spec = ModelSpec.from_hf_config(hf_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)


def test_unsupported_architecture_named():
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        ModelSpec.from_hf_config(hf_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"))


def test_unsupported_rope_named():
    with pytest.raises(ConfigError, match="longrope"):
        ModelSpec.from_hf_config(hf_config(rope_scaling={"rope_type": "longrope", "factor": 2.0}))


def test_missing_field_named():
    cfg = hf_config()
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelSpec.from_hf_config(cfg)


def test_bad_head_counts():
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        tiny_spec(num_heads=4, num_kv_heads=3)


def test_json_round_trip_and_hash():
    spec = tiny_spec(rope_scaling=RopeScaling("yarn", 4.0, 256))
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.hash == spec.hash
    assert tiny_spec().hash != spec.hash


def test_json_rejects_unknown_version_and_fields():
    data = tiny_spec().to_dict()
    with pytest.raises(ConfigError, match="version"):
        ModelSpec.from_dict({**data, "version": 99})
    with pytest.raises(ConfigError, match="bogus"):
        ModelSpec.from_dict({**data, "bogus": 1})

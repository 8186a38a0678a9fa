"""Chat prompts in the model's own template (torch-free).

A converted model keeps the Jinja chat template its GGUF metadata (`tokenizer.chat_template`) or its
Hugging Face `tokenizer_config.json` carries, as `chat_template.jinja` beside `tokenizer.json`; an
export copies it to the device. Models without one get ChatML when their tokenizer has its markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tokenizers import Tokenizer

from splitlm.errors import ConfigError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
"""The ChatML markers of the fallback template (SmolLM2, Qwen2 use ChatML)."""


def template_from_gguf(fields: Mapping[str, Any]) -> str | None:
    """The chat template in GGUF metadata, or None."""
    template = fields.get("tokenizer.chat_template")
    return template if isinstance(template, str) and template.strip() else None


def template_from_hf_dir(src: Path) -> str | None:
    """The chat template of a Hugging Face directory (chat_template.jinja, else tokenizer_config.json), or None."""
    if (src / CHAT_TEMPLATE_FILE).is_file():
        return (src / CHAT_TEMPLATE_FILE).read_text()
    config = src / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def save_template(template: str | None, folder: Path) -> None:
    """Write `template` as folder/chat_template.jinja (nothing when there is none)."""
    if template is not None:
        (folder / CHAT_TEMPLATE_FILE).write_text(template)


def load_template(folder: str | Path) -> str | None:
    """The chat template saved in `folder` (a model cache or an export side), or None."""
    path = Path(folder) / CHAT_TEMPLATE_FILE
    return path.read_text() if path.is_file() else None


ROLES = ("system", "user", "assistant")


def chat_prompt(prompt: "str | list[Mapping[str, str]]", tokenizer: Tokenizer, template: str | None,
                bos_token_id: int | None = None, eos_token_id: int | None = None) -> str:
    """`prompt` (one user turn, or a list of {"role", "content"} messages) followed by the assistant's turn,
    in `template` (Jinja, rendered as Hugging Face renders it); in ChatML when `template` is None.
    ConfigError when there is no template and the tokenizer lacks the ChatML markers, when a message is
    malformed, or when the template cannot be rendered."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"message {i} must be {{'role': one of {list(ROLES)}, 'content': a string}}, got {str(m)[:80]!r}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not messages:
        raise ConfigError("a chat needs at least one message")
    if template is None:
        if any(tokenizer.token_to_id(t) is None for t in CHAT_TOKENS):
            raise ConfigError(f"--chat: this model has no chat template and its tokenizer has no {' / '.join(CHAT_TOKENS)} "
                              "tokens for ChatML; drop --chat and write the prompt in the model's format")
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError("--chat: rendering the model's chat template needs jinja2 (pip install jinja2)") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def token(i: int | None) -> str:
        return (tokenizer.id_to_token(i) or "") if i is not None else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=token(bos_token_id), eos_token=token(eos_token_id))
    except TemplateError as exc:
        raise ConfigError(f"--chat: the model's chat template does not render: {exc}") from None

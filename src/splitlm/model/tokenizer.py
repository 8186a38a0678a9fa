"""Tokenizers built with the `tokenizers` library (torch-free).

GGUF files carry their vocabulary and merges as metadata; `tokenizer_from_gguf`
rebuilds an equivalent `tokenizer.json`. `byte_tokenizer` makes the byte-level
tokenizer of the tiny test models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from splitlm.errors import ConfigError, ModelLoadError

# GGUF `tokenizer.ggml.pre` -> the pre-tokenizer llama.cpp uses for it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split_regex: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
}


def build_bpe_tokenizer(tokens: Sequence[str], merges: Iterable[str], special: Sequence[str], pre: str) -> Tokenizer:
    """A byte-level BPE tokenizer from a vocabulary, merges and special tokens."""
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"tokenizer pre-type {pre!r} is not supported; use one of {sorted(PRE_TOKENIZERS)}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


def tokenizer_from_gguf(fields: dict) -> Tokenizer:
    """Rebuild the tokenizer stored in GGUF metadata (`fields`: key -> value)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2'); "
            "load the model from its Hugging Face directory instead"
        )
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # control, user-defined
    return build_bpe_tokenizer(tokens, fields.get("tokenizer.ggml.merges") or [], special, fields.get("tokenizer.ggml.pre", "default"))


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """The tokenizer saved at `path` (a tokenizer.json); ModelLoadError naming the file when it is
    missing or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"tokenizer file {path} is missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ModelLoadError(f"tokenizer file {path} is unreadable ({exc})") from None


BYTE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer with 256 byte tokens (ids 3..258) and 3 specials (ids 0..2)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    return build_bpe_tokenizer(list(BYTE_SPECIALS) + byte_chars, [], BYTE_SPECIALS, "default")


def _byte_of(ch: str) -> int:
    # GPT-2 byte-to-unicode map, inverted
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    extra = [b for b in range(256) if b not in printable]
    return extra[code - 256]


class StreamingDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix)
        self.emitted = len(tokenizer.decode(self.ids)) if self.ids else 0
        self.start = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

"""The text every measurement and calibration reads (torch-free): Python's own `pydoc_data.topics`
texts in sorted key order, joined by blank lines, cut into windows of tokens. Evaluation reads the
first windows, calibration (GPTQ, KV scales) the last ones.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from splitlm.errors import ConfigError

WINDOW = 512


def protocol_text() -> str:
    """The evaluation corpus of DESIGN.md §10."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {exc}") from None


def windows(tokenizer: Tokenizer, text: str, count: int, size: int = WINDOW, skip: int = 0) -> list[list[int]]:
    """Windows `skip` .. `skip+count` of `size` tokens; ConfigError when the text is too short."""
    if count < 1 or size < 2:
        raise ConfigError(f"need at least 1 window of at least 2 tokens, got {count} of {size}")
    ids = tokenizer.encode(text).ids
    available = len(ids) // size
    if available < skip + count:
        raise ConfigError(f"the text has {len(ids)} tokens: {available} windows of {size}, {skip + count} asked for")
    return [ids[(skip + i) * size:(skip + i + 1) * size] for i in range(count)]


CALIBRATION_WINDOWS = 16


def calibration_windows(tokenizer: Tokenizer, count: int = CALIBRATION_WINDOWS, size: int = WINDOW,
                        text: str | None = None) -> list[list[int]]:
    """The last `count` windows of the protocol corpus: disjoint from the first evaluation windows."""
    ids = tokenizer.encode(text if text is not None else protocol_text()).ids
    available = len(ids) // size
    if available < count:
        raise ConfigError(f"the calibration text has {available} windows of {size} tokens, {count} asked for")
    first = available - count
    return [ids[(first + i) * size:(first + i + 1) * size] for i in range(count)]


def eval_windows_limit(tokenizer: Tokenizer, calib_count: int = CALIBRATION_WINDOWS, size: int = WINDOW) -> int:
    """How many leading windows can be evaluated without touching the calibration windows."""
    return len(tokenizer.encode(protocol_text()).ids) // size - calib_count

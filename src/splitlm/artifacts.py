"""Reading an export: DIR/device and DIR/cloud, each with its manifest, plan and model spec. torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from splitlm.errors import ModelLoadError
from splitlm.model import names
from splitlm.model.checkpoint import sha256_file
from splitlm.model.spec import ModelSpec
from splitlm.partition.plan import Plan

MANIFEST_FILE = "manifest.json"
SIDES = {"device": names.HEAD_FILE, "cloud": names.TAIL_FILE}
"""The folders of an export root and the file each must hold."""


def export_side(root: str | Path, side: str) -> Path:
    """ROOT/`side` of the export root `root`; a ModelLoadError that says so when `root` is itself
    the device or cloud folder of an export, or is not a directory."""
    root = Path(root)
    folder = root / side
    if folder.is_dir():
        return folder
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory: pass the --out directory of `splitlm export`")
    if side == "cloud" and (root / "device").is_dir():
        raise ModelLoadError(f"{root} has no cloud/ folder: it is a device-only export, without a cloud part")
    kind = next((k for k, main in SIDES.items() if (root / main).is_file()), root.name if root.name in SIDES else None)
    if kind is not None and ((root / MANIFEST_FILE).is_file() or (root / "plan.json").is_file()):
        raise ModelLoadError(f"{root} looks like the {kind} folder of an export; pass its parent {root.parent}")
    return folder


def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest (check_manifest has read it once already)."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable ({type(exc).__name__}: {exc}); export again") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path} is not a JSON object; export again")
    return manifest


def check_manifest(folder: str | Path, verify: bool = False) -> None:
    """Check that every file the folder's manifest lists is there with its size, and with `verify`
    also its sha256; raise ModelLoadError naming the first file that is not."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no {MANIFEST_FILE}: the export is incomplete; export it again")
    try:
        files = json.loads(path.read_text())["files"]
        listed = [(name, int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{path} is unreadable ({type(exc).__name__}: {exc}); export again") from None
    for name, size, digest in listed:
        file = folder / name
        if not file.is_file():
            raise ModelLoadError(f"{file} is missing (the manifest lists it); export again")
        if file.stat().st_size != size:
            raise ModelLoadError(f"{file} has {file.stat().st_size} bytes, the manifest says {size}: "
                                 "truncated or replaced; export again")
        if verify and sha256_file(file) != digest:
            raise ModelLoadError(f"{file} does not match the sha256 in its manifest: corrupt or replaced; export again")


def read_folder(folder: str | Path, main_file: str, verify: bool = False) -> tuple[Path, Plan, ModelSpec]:
    """Check that `folder` holds `main_file` and the files of its manifest (sizes; sha256 with
    `verify`); return the folder, its plan and its model spec."""
    folder = Path(folder)
    if not (folder / main_file).is_file():
        raise ModelLoadError(f"{folder} has no {main_file}: export one with `splitlm export`")
    check_manifest(folder, verify)
    try:
        plan = Plan.load(folder / "plan.json")
        spec = ModelSpec.from_json((folder / "spec.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: unreadable plan or spec ({exc})") from None
    return folder, plan, spec

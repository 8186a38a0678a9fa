"""Reading an exported folder (DIR/device or DIR/cloud): its plan and model spec. torch-free."""

from __future__ import annotations

from pathlib import Path

from splitlm.errors import ModelLoadError
from splitlm.model.spec import ModelSpec
from splitlm.partition.plan import Plan


def read_folder(folder: str | Path, main_file: str) -> tuple[Path, Plan, ModelSpec]:
    """Check that `folder` holds `main_file`, plan.json and spec.json; return them parsed."""
    folder = Path(folder)
    if not (folder / main_file).is_file():
        raise ModelLoadError(f"{folder} has no {main_file}: export one with `splitlm export`")
    try:
        plan = Plan.load(folder / "plan.json")
        spec = ModelSpec.from_json((folder / "spec.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: unreadable plan or spec ({exc})") from None
    return folder, plan, spec

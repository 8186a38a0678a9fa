"""The profile's progress bar and phase reports (torch-free): the bar names the step that is running, and
on_phase(name, values) hears what each phase measured as it ends, so that what finished is kept when a
later phase fails (write_partial)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from tqdm import tqdm

T = TypeVar("T")


class Report:
    def __init__(self, total: int, progress: bool, on_phase: Callable[[str, dict], None] | None, desc: str = "profile"):
        self.bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        self.on_phase = on_phase
        self.progress = progress

    def run(self, name: str, fn: Callable[[], T], *, step: bool = True) -> T:
        """Run phase `name` (the bar says so while it runs), report what it measured (a dataclass's fields,
        or {"value": result}) and, for a `step`, advance the bar."""
        self.bar.set_postfix_str(name)
        self.bar.refresh()
        result = fn()
        self.note(name, **({f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
                           if dataclasses.is_dataclass(result) else {"value": result}))
        if step:
            self.bar.update()
        return result

    def note(self, name: str, **values) -> None:
        """Report what phase `name` measured, without a step of the bar."""
        if self.on_phase is not None:
            self.on_phase(name, values)

    def close(self) -> None:
        self.bar.close()


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def write_partial(path: str | Path, model: Any, phases: dict[str, dict], error: BaseException) -> None:
    """Write the phases `measure_profile` finished before `error` stopped it, with what each measured
    (as handed to on_phase), as JSON to `path`: not a Profile, the raw measurements."""
    doc = {"partial": True, "model_id": model.model_id, "weights_hash": model.weights_hash,
           "stopped_by": f"{type(error).__name__}: {error}".strip(), "phases": phases}
    Path(path).write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")

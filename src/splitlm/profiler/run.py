"""The profile's phases in order, with a progress bar and a report after each (on_phase), so that what
finished is kept when a later phase fails (write_partial): `measure_profile` on one machine, or in
halves on two (`measure_cloud_half` writes the kit, `measure_device_half` reads it)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from splitlm.model.checkpoint import Checkpoint
from splitlm.partition.profile import CloudProfile, LinkProfile, Profile, merge
from splitlm.profiler import cloud, device
from splitlm.profiler.config import ProfileConfig, export_kit, kit_of, prepare
from splitlm.profiler.report import Report


def measure_profile(ckpt: Checkpoint, link: LinkProfile, config: ProfileConfig = ProfileConfig(), *, progress: bool = True,
                    on_phase: Callable[[str, dict], None] | None = None) -> Profile:
    """Measure everything the partitioner prices on this one machine (see the package docstring): the
    calibration kit, the device's half from it, the cloud's half, merged. on_phase(name, values) is called
    as each phase ends with what it measured, so that a caller can keep those values when a later phase
    fails or is interrupted (write_partial)."""
    with tempfile.TemporaryDirectory() as tmp:
        bench = prepare(ckpt, config, Path(tmp))
        report = Report(1 + cloud.cloud_steps(bench) + device.device_steps(kit_of(bench)), progress, on_phase)
        kit = report.run("calibration kit", lambda: export_kit(bench, progress=False))
        half = device.measure_device(kit, link, report, config.server)
        profile = merge(half, cloud.measure_cloud(bench, kit, report))
    report.close()
    return profile


def measure_cloud_half(ckpt: Checkpoint, kit_dir: Path, config: ProfileConfig = ProfileConfig(), *, progress: bool = True,
                       on_phase: Callable[[str, dict], None] | None = None) -> CloudProfile:
    """The cloud's half of a two-machine profile: export the calibration kit into `kit_dir` (for
    `splitlm profile --device` on the device) and measure the cloud here. The kit keeps only what the
    device reads: the calibration exports' cloud/ folders, served here over loopback, are removed."""
    bench = prepare(ckpt, config, Path(kit_dir))
    report = Report(1 + cloud.cloud_steps(bench), progress, on_phase)
    kit = report.run("calibration kit", lambda: export_kit(bench, progress=False))
    half = cloud.measure_cloud(bench, kit, report)
    for folder in Path(kit_dir).glob("*/cloud"):
        shutil.rmtree(folder)
    report.close()
    return half

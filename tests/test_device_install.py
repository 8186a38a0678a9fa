"""The device install: `pip install -e '.[device]'` into a fresh venv, without torch, runs the device side
(split generation, the Python API, `profile --link-only`) against a server from the full install, and a
command that needs torch says which install it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("device-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[device]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, f"the device extra does not install: {pip.stderr[-2000:]}"
    return venv / "bin"


def _run(bin_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_the_device_install_runs_the_device_side_without_torch(device_venv, artifacts, serve, tmp_path):
    from tests.test_partition import synthetic

    art = str(artifacts[1].device_dir.parent)
    address, _ = serve()
    assert _run(device_venv, "python", "-c", "import torch").returncode != 0, "the device install brought torch"
    args = ["generate", "--artifacts", art, "--server", address, "--prompt", "from the device ", "--max-tokens", "6"]
    here = _run(device_venv, "splitlm", *args)
    assert here.returncode == 0, here.stderr
    full = subprocess.run([sys.executable, "-m", "splitlm.cli", *args], capture_output=True, text=True, timeout=300)
    assert here.stdout == full.stdout  # the same split generation as from the full install
    api = _run(device_venv, "python", "-c", "import sys, splitlm\n"
               f"print(len(splitlm.Device({art!r}, server={address!r}).generate('x', 3).token_ids))\n"
               "assert 'torch' not in sys.modules")
    assert api.returncode == 0 and api.stdout.strip() == "3", api.stderr
    synthetic().save(tmp_path / "profile.json")
    link = _run(device_venv, "splitlm", "profile", "--link-only", str(tmp_path / "profile.json"), "--server", address,
                "--bandwidth", "20", "--out", str(tmp_path / "here.json"))
    assert link.returncode == 0 and "Mbit/s, RTT" in link.stdout, link.stderr
    needs = _run(device_venv, "splitlm", "export", "--model", "tiny-random", "--split", "2", "--out", str(tmp_path / "x"))
    assert needs.returncode == 2 and "needs the full install" in needs.stderr and "splitlm[cloud]" in needs.stderr, needs.stderr
    assert "Traceback" not in needs.stderr


def test_the_device_install_profiles_its_half_on_a_kit(device_venv, tiny_ckpt, serve, tmp_path):
    """The device's half of `profile` runs in the device install (no torch) on a kit written by the full
    install, probes the link to a running server, and partition merges it with the cloud's half."""
    from splitlm.partition.profile import save_part
    from splitlm.profiler import ProfileConfig, measure_cloud_half
    from tests.test_partition import TINY_PROFILE

    save_part(measure_cloud_half(tiny_ckpt, tmp_path / "kit", ProfileConfig(**TINY_PROFILE), progress=False),
              tmp_path / "cloud.json")
    address, _ = serve()
    here = _run(device_venv, "splitlm", "profile", "--device", str(tmp_path / "kit"), "--server", address, "--bandwidth", "20",
                "--out", str(tmp_path / "device.json"), timeout=600)
    assert here.returncode == 0 and "RTT" in here.stdout, here.stderr
    plan = _run(device_venv, "splitlm", "partition", "--profile", str(tmp_path / "device.json"), str(tmp_path / "cloud.json"),
                "--device-memory", "1GB", "--token-latency", "1s", "--out", str(tmp_path / "plan.json"))
    assert plan.returncode == 0 and "chose" in plan.stdout, plan.stderr
    wrong = _run(device_venv, "splitlm", "profile", "--device", str(tmp_path), "--out", str(tmp_path / "x.json"))
    assert wrong.returncode == 2 and "not a calibration kit" in wrong.stderr and "Traceback" not in wrong.stderr

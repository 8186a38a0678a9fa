"""What each install imports, checked in a fresh interpreter (the import contract in
pyproject.toml checks the static graph; this checks what lazy imports really load)."""

import subprocess
import sys

import pytest


def loaded_after(statement: str, watched: tuple[str, ...]) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("module", ["splitlm.device.runtime", "splitlm.device.client"])
def test_the_device_runs_without_torch(module):
    assert loaded_after(f"import {module}", ("torch", "triton", "splitlm.cloud", "splitlm.kernels")) == []


def test_the_device_codec_round_trip_loads_no_torch():
    statement = ("import numpy as np\nfrom splitlm.quantize import codec\nfrom splitlm.quantize.config import CodecConfig\n"
                 "x = np.ones((2, 64), np.float32)\ncodec.decode(codec.encode(x, CodecConfig('tabq', entropy='none')))")
    assert loaded_after(statement, ("torch",)) == []


def test_the_cloud_loads_the_kernels_only_when_they_may_run():
    """On a CPU with kernels='auto' the tail uses the torch references: no Triton, no kernels module."""
    assert loaded_after("import splitlm.cloud.service\nfrom splitlm.cloud.tail import kernel_impl\nimport torch\n"
                        "assert kernel_impl('auto', torch.device('cpu')) == 'reference'",
                        ("triton", "splitlm.kernels", "splitlm.device")) == []


def test_the_model_package_loads_nothing_else_of_ours():
    loaded = loaded_after("import splitlm.model.llama, splitlm.model.load, splitlm.model.convert, splitlm.model.registry",
                          ("splitlm.quantize", "splitlm.partition", "splitlm.device", "splitlm.cloud", "splitlm.export"))
    assert loaded == []

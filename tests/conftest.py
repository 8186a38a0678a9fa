"""Shared fixtures: an isolated model cache and the tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA; the switch is read when
# a kernel is decorated, so it must be set before any splitlm.kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the SmolLM2 model-level tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="model-level test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session converts into its own cache, except the SmolLM2 cache which is shared to save time."""
    root = tmp_path_factory.mktemp("splitlm-cache")
    old = os.environ.get("SPLITLM_CACHE")
    os.environ["SPLITLM_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SPLITLM_CACHE", None)
    else:
        os.environ["SPLITLM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_ckpt():
    from splitlm.model.registry import resolve_model

    return resolve_model("tiny-random", progress=False)


@pytest.fixture(scope="session")
def smollm_ckpt():
    """SmolLM2 from the user's normal cache (converted once per machine)."""
    from splitlm.model.checkpoint import cache_root
    from splitlm.model.registry import resolve_model

    shared = Path(os.environ.get("SPLITLM_TEST_MODEL_CACHE", Path.home() / ".cache" / "splitlm"))
    try:
        return resolve_model("smollm2-135m", root=shared, progress=False)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"SmolLM2 is not available: {exc} (cache root {cache_root()})")

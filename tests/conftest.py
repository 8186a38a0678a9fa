"""Shared fixtures: an isolated model cache and the tiny random model; hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests. "ci" (selected by CI=true) is deterministic: derandomized, a fixed number of
# examples, no example database, no deadline. "dev" explores new random examples each run and
# replays saved failures from the database; "fresh" is "dev" without the database (the one for
# "N runs in a row"). HYPOTHESIS_PROFILE, or --hypothesis-profile, picks one by name.
# A test's own @settings (e.g. max_examples) still win over its profile. All three derive from
# hypothesis' "default" profile, not from whatever it loaded on its own (its built-in "ci"
# whenever a CI variable is merely present).
_base = settings.get_profile("default")
settings.register_profile("ci", _base, derandomize=True, max_examples=100, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", _base, max_examples=100, deadline=None, print_blob=True)
settings.register_profile("fresh", settings.get_profile("dev"), database=None)
_in_ci = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _in_ci else "dev"))

# `splitlm generate` picks torch's thread count from the cores idle when it starts, unless OMP_NUM_THREADS
# is set: the in-process CLI tests would change this process's torch threads for every later test.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

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


@pytest.fixture(scope="session")
def artifacts(tiny_ckpt, tmp_path_factory):
    """(plan, ExportResult): the tiny model split at 2 (W4 head, W8 tail, tabq ε 0.01, prefill chunks of 8),
    exported once for every service, client, fuzz and fault test. Tests must not modify it."""
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig, WeightQuant

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, device_weights=WeightQuant(4, 32),
                cloud_weights=WeightQuant(8, 32), codec=CodecConfig("tabq", entropy="none", error_budget=0.01), max_seq_len=128,
                prefill_chunk=8)
    return plan, export_artifacts(tiny_ckpt, plan, tmp_path_factory.mktemp("svc"), progress=False, accuracy_level=0)


@pytest.fixture()
def serve(artifacts):
    """start(**config) -> (address, service); every server started is stopped at the end."""
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    servers = []

    def start(**config):
        srv, port, service = start_server(TailRunner(artifacts[1].cloud_dir), "127.0.0.1:0", ServerConfig(**config))
        servers.append(srv)
        return f"127.0.0.1:{port}", service

    yield start
    for srv in servers:
        srv.stop(grace=None)

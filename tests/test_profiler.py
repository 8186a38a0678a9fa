"""The profiler's device probes (`python -m splitlm.device.probe`, fresh processes without torch) and its config."""

import json
import subprocess
import sys

import pytest

from splitlm.errors import ConfigError
from splitlm.profiler.probes import child_env

MB = 2**20


def probe(*args: str) -> dict:
    """Run the probe module as the profiler does; its one line of JSON."""
    out = subprocess.run([sys.executable, "-m", "splitlm.device.probe", *args], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def bare_graph(tmp_path_factory):
    """An ONNX graph with the LM-head probe's inputs (input_ids, position_ids) and one output."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "position_ids"], ["logits"])], "bare",
        [helper.make_tensor_value_info(name, TensorProto.INT64, [1, 1]) for name in ("input_ids", "position_ids")],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 1])])
    path = tmp_path_factory.mktemp("graph") / "bare.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_probe_baseline_prints_the_peak_rss_of_the_bare_runtime(artifacts):
    result = probe("baseline", str(artifacts[1].device_dir))
    assert set(result) == {"peak_rss_bytes"} and 10 * MB < result["peak_rss_bytes"] < 1024 * MB


def test_probe_run_head_prints_a_peak_rss_on_text_and_on_the_synthetic_pattern(artifacts, tmp_path):
    device_dir = str(artifacts[1].device_dir)
    text = tmp_path / "ids.txt"
    text.write_text(" ".join(str(t) for t in range(3, 40)))
    on_text = probe("run-head", device_dir, "--positions", "20", "--text", str(text), "--threads", "1")
    synthetic = probe("run-head", device_dir, "--positions", "20")
    for result in (on_text, synthetic):
        assert set(result) == {"peak_rss_bytes"} and 10 * MB < result["peak_rss_bytes"] < 1024 * MB


def test_probe_first_call_prints_its_ms(artifacts):
    result = probe("first-call", str(artifacts[1].device_dir), "--prompt", "5,6,7,8", "--threads", "1")
    assert set(result) == {"first_call_ms"} and 0 < result["first_call_ms"] < 60_000


def test_probe_run_graph_prints_a_peak_rss(bare_graph):
    result = probe("run-graph", str(bare_graph))
    assert set(result) == {"peak_rss_bytes"} and result["peak_rss_bytes"] > MB


def test_probe_refuses_a_prompt_that_is_not_token_ids(artifacts):
    out = subprocess.run([sys.executable, "-m", "splitlm.device.probe", "first-call", str(artifacts[1].device_dir),
                          "--prompt", "5,x"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.returncode == 2 and "'5,x' is not comma-separated token ids" in out.stderr


def test_probe_runs_without_torch(artifacts, bare_graph):
    """The probes are the device install's programs: every command runs with no torch (nor triton) imported."""
    device_dir = str(artifacts[1].device_dir)
    code = (
        "import json, sys\n"
        "from splitlm.device import probe\n"
        f"for argv in ({['baseline', device_dir]!r}, {['run-head', device_dir, '--positions', '12']!r},\n"
        f"             {['first-call', device_dir, '--prompt', '5,6']!r}, {['run-graph', str(bare_graph)]!r}):\n"
        "    probe.main(argv)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'safetensors'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1]) == []


def test_the_probe_processes_measure_what_the_profiler_asks(artifacts):
    from splitlm.profiler.probes import first_call_ms, measure_peak_rss, runtime_baseline_bytes

    device_dir = artifacts[1].device_dir
    runtime = runtime_baseline_bytes(device_dir)
    assert runtime < measure_peak_rss(device_dir, 40, threads=1, text=list(range(3, 30)))
    assert first_call_ms(device_dir, [5, 6, 7], threads=1, runs=1) > 0
    with pytest.raises(RuntimeError, match="memory probe failed: .*"):
        measure_peak_rss(device_dir.parent / "missing", 10)


@pytest.mark.parametrize("changes, message", [
    ({"bits": (16, 5)}, r"ProfileConfig.bits \(16, 5\): give one or more of \(16, 8, 4, 3, 2\)"),
    ({"kv_bits": ()}, r"ProfileConfig.kv_bits \(\): give one or more of \(16, 8, 4\)"),
    ({"contexts": (0, 128)}, r"ProfileConfig.contexts \(0, 128\): give one or more positive contexts"),
    ({"prefill": 16}, r"ProfileConfig.prefill 16: must be > 16"),
    ({"reps": 0}, r"ProfileConfig.reps must be >= 1, got 0"),
    ({"cloud_probe_layers": 0}, r"ProfileConfig.cloud_probe_layers must be >= 1, got 0"),
])
def test_profile_config_names_a_bad_value(changes, message):
    from splitlm.profiler import ProfileConfig

    with pytest.raises(ConfigError, match=message):
        ProfileConfig(**changes)

"""The `splitlm` command, run in-process on the tiny model."""

import json
import re

import pytest

from splitlm.cli import main
from tests.tolerances import TOL


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_default_and_tiny(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "tiny-random" in out


def test_generate_same_greedy_text_at_every_split(capsys):
    texts = []
    for split in ("0", "2", "4"):
        code, out, err = run(capsys, "generate", "--model", "tiny-random", "--split", split, "--prompt", "abc", "--max-tokens", "10")
        assert code == 0, err
        assert out.startswith("abc")
        assert f"[split {split}/4]" in err and "tokens/s" in err
        texts.append(out)
    assert texts[0] == texts[1] == texts[2]


def test_generate_with_plan_file(capsys, tmp_path, tiny_ckpt):
    from splitlm.partition.plan import Plan

    Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 1, max_seq_len=64).save(tmp_path / "plan.json")
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--plan", str(tmp_path / "plan.json"), "--prompt", "x", "--max-tokens", "3")
    assert code == 0 and "[split 1/4]" in err


def test_seeded_sampling_is_reproducible(capsys):
    args = ("generate", "--model", "tiny-random", "--prompt", "q", "--max-tokens", "12", "--temperature", "1.0", "--seed", "7")
    assert run(capsys, *args)[1] == run(capsys, *args)[1]


@pytest.mark.parametrize("argv, message", [
    (("generate", "--model", "tiny-random", "--split", "9", "--prompt", "x"), r"split layer 9 is outside \[0, 4\]"),
    (("generate", "--model", "no-such-model", "--prompt", "x"), "unknown model 'no-such-model'"),
    (("generate", "--model", "tiny-random", "--prompt", "x", "--top-p", "2"), "top_p"),
    (("generate", "--model", "tiny-random", "--prompt", "x", "--max-tokens", "0"), "--max-tokens must be >= 1, got 0"),
    (("generate", "--model", "tiny-random", "--prompt", "", "--max-tokens", "3"), "prompt is empty"),
    (("generate", "--model", "tiny-random", "--plan", "/nonexistent/plan.json", "--prompt", "x"), "cannot read plan"),
    (("eval", "--model", "tiny-random", "--text", "/nonexistent.txt"), "cannot read"),
])
def test_errors_are_one_line_not_tracebacks(capsys, argv, message):
    import re

    code, _, err = run(capsys, *argv)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err


def assert_one_line_error(capsys, argv, message, code=2):
    """`splitlm argv` fails with `code` and one line on stderr that matches `message`, no traceback."""
    import re

    got, _, err = run(capsys, *argv)
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    return err


@pytest.mark.parametrize("argv, message", [
    # defect 5: values that wrapped around or reached a traceback
    (("serve", "--artifacts", "art", "--port", "99999"), r"--port 99999 is not a TCP port: give 0\.\.65535"),
    (("serve", "--artifacts", "art", "--port", "-1"), r"--port -1 is not a TCP port"),
    (("generate", "--artifacts", "art", "--server", "127.0.0.1:1", "--prompt", "x", "--max-tokens", "-3"),
     "--max-tokens must be >= 1, got -3"),
    (("demo", "--model", "tiny-random", "--max-tokens", "-3"), "--max-tokens must be >= 1, got -3"),
    (("demo", "--model", "tiny-random", "--max-tokens", "0"), "--max-tokens must be >= 1, got 0"),
    # defect 6: flags that a path ignores
    (("generate", "--model", "tiny-random", "--server", "127.0.0.1:1", "--prompt", "x"), "--server needs --artifacts"),
    (("generate", "--model", "tiny-random", "--threads", "0", "--prompt", "x"), "--threads must be >= 1, got 0"),
    (("generate", "--model", "tiny-random", "--verify", "--prompt", "x"), "--verify needs --artifacts"),
    (("generate", "--model", "tiny-random", "--speculate", "--prompt", "x"), "--speculate needs --artifacts"),
    (("generate", "--artifacts", "art", "--token", "t", "--prompt", "x"), "--token needs --server"),
    (("generate", "--artifacts", "art", "--tls-ca", "ca.pem", "--prompt", "x"), "--tls-ca needs --server"),
    (("generate", "--model", "tiny-random", "--prompt", "x", "--top-k", "5", "--seed", "1"),
     r"--top-k, --seed would be ignored: --temperature 0 .* is greedy"),
    (("eval", "--model", "tiny-random", "--split", "2", "--device-group", "32"),
     "--device-group would be ignored: --device-bits 16 is unquantized"),
    (("eval", "--model", "tiny-random", "--split", "2", "--codec-eps", "0.01"),
     "--codec-eps would be ignored: they tune the tabq codec, not --codec fp32"),
    (("eval", "--model", "tiny-random", "--split", "4", "--cloud-bits", "8"),
     "--cloud-bits would be ignored: split 4 leaves no layers on the cloud"),
    (("eval", "--model", "tiny-random", "--split", "0", "--kv-bits", "8"), "--kv-bits would be ignored: split 0"),
    (("eval", "--model", "tiny-random", "--split", "2", "--device-bits", "8", "--calib-windows", "4"),
     "--calib-windows would be ignored: it feeds calibrated quantization methods"),
    (("export", "--model", "tiny-random", "--split", "2", "--accuracy-level", "0", "--out", "unused"),
     "--accuracy-level 0 would be ignored"),
    (("export", "--model", "tiny-random", "--split", "2", "--out", "plan.json"), r"--out plan.json is a file; give a directory"),
    (("profile", "--server", "127.0.0.1:1", "--rtt", "5ms", "--out", "unused"), "--rtt would be ignored: --server probes the RTT"),
    (("profile", "--link-only", "plan.json", "--model", "tiny-random", "--rtt", "5ms", "--out", "unused"),
     "--model would be ignored: --link-only measures nothing but the link"),
])
def test_bad_values_and_ignored_flags_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # nothing is written, but relative paths stay in the test's folder
    (tmp_path / "plan.json").write_text("{}")
    assert_one_line_error(capsys, argv, message)
    assert not (tmp_path / "unused").exists()


def test_split_and_plan_flags_with_a_plan_file_are_refused(capsys, tmp_path, tiny_ckpt):
    from splitlm.partition.plan import Plan

    plan = tmp_path / "plan.json"
    Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 1, max_seq_len=64).save(plan)
    assert_one_line_error(capsys, ("generate", "--model", "tiny-random", "--plan", str(plan), "--split", "3", "--prompt", "x"),
                          r"--split 3 differs from the split 1 of --plan .*plan.json")
    assert_one_line_error(capsys, ("eval", "--model", "tiny-random", "--plan", str(plan), "--codec", "tabq"),
                          r"--codec would be ignored: --plan .*plan.json fixes the plan")
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--plan", str(plan), "--split", "1", "--prompt", "x",
                       "--max-tokens", "2")
    assert code == 0 and "[split 1/4]" in err


@pytest.mark.parametrize("out, message", [
    ("missing/p.json", r"--out .*missing/p.json: directory .*missing does not exist"),
    (".", r"--out \. is a directory; give a file name"),
])
def test_outputs_are_checked_before_any_work(capsys, tmp_path, monkeypatch, out, message):
    """profile --out into a missing directory used to measure for 20 minutes, then throw."""
    import splitlm.profiler as profiler

    def never(*args, **kwargs):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(profiler, "measure_profile", never)
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(capsys, ("profile", "--model", "tiny-random", "--out", out), message)
    assert_one_line_error(capsys, ("generate", "--model", "tiny-random", "--prompt", "x", "--json", out), message.replace("--out", "--json"))
    assert_one_line_error(capsys, ("partition", "--profile", "p.json", "--device-memory", "1GB", "--token-latency", "1s",
                                   "--out", out), message)


def test_profile_checks_its_server_before_measuring(capsys, tmp_path, monkeypatch):
    import splitlm.profiler as profiler

    monkeypatch.chdir(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("measured before probing --server")

    monkeypatch.setattr(profiler, "measure_profile", never)
    assert_one_line_error(capsys, ("profile", "--model", "tiny-random", "--server", "127.0.0.1:1", "--out", "p.json"),
                          "cannot probe the link to 127.0.0.1:1")


def test_a_plan_passed_as_a_profile_is_named(capsys, tmp_path, tiny_ckpt):
    from splitlm.partition.plan import Plan

    Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 1).save(tmp_path / "plan.json")
    assert_one_line_error(capsys, ("partition", "--profile", str(tmp_path / "plan.json"), "--device-memory", "1GB",
                                   "--token-latency", "1s", "--out", str(tmp_path / "x.json")),
                          r"plan.json is a plan, not a profile")
    assert_one_line_error(capsys, ("profile", "--link-only", str(tmp_path / "plan.json"), "--rtt", "5ms",
                                   "--out", str(tmp_path / "x.json")), r"plan.json is a plan, not a profile")


def test_a_failed_save_keeps_the_result(tmp_path):
    from splitlm.cli.flags import save_or_keep
    from splitlm.errors import ConfigError

    saved = []

    def save(path):
        if str(path).startswith(str(tmp_path)):
            raise FileNotFoundError(2, "No such file or directory")
        saved.append(path)
        with open(path, "w") as f:
            f.write("{}")

    with pytest.raises(ConfigError, match=r"cannot write .*gone.json \(No such file or directory\); the plan is saved in "):
        save_or_keep(save, str(tmp_path / "gone.json"), "plan")
    assert len(saved) == 1 and open(saved[0]).read() == "{}"
    import os
    os.unlink(saved[0])


def test_plan_for_other_weights_is_refused(capsys, tmp_path):
    from splitlm.partition.plan import Plan

    Plan("tiny-random", "ffffffffffffffff", 1).save(tmp_path / "plan.json")
    code, _, err = run(capsys, "generate", "--model", "tiny-random", "--plan", str(tmp_path / "plan.json"), "--prompt", "x")
    assert code == 2 and "plan was made for weights ffffffffffffffff" in err


def test_eval_on_text_file(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", "--model", "tiny-random", "--text", str(text), "--windows", "2",
                         "--window-size", "128", "--json", str(out_json))
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["windows"] == 2 and result["tokens"] == 2 * 127
    assert result["perplexity"] > 1 and f"{result['perplexity']:.4f}" in out


def test_eval_text_too_short(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("short")
    code, _, err = run(capsys, "eval", "--model", "tiny-random", "--text", str(text), "--windows", "2")
    assert code == 2 and "windows of 512" in err


def test_eval_split_does_not_change_perplexity(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("splitting a model should not change its perplexity at all. " * 30)
    ppl = []
    for split in ("0", "3"):
        out_json = tmp_path / f"{split}.json"
        assert run(capsys, "eval", "--model", "tiny-random", "--split", split, "--text", str(text), "--windows", "2",
                   "--window-size", "200", "--json", str(out_json))[0] == 0
        ppl.append(json.loads(out_json.read_text())["perplexity"])
    assert ppl[0] == pytest.approx(ppl[1], rel=TOL["ppl_across_splits_rel"])


def test_demo_runs_end_to_end_on_tiny_model(capsys):
    code, out, _ = run(capsys, "demo", "--model", "tiny-random", "--max-tokens", "5")
    assert code == 0 and "time to first token" in out and "over gRPC on 127.0.0.1:" in out
    assert "bytes up per position" in out
    code, out2, _ = run(capsys, "demo", "--model", "tiny-random", "--max-tokens", "5")  # export reused
    assert code == 0


def test_eval_plan_flags_report_bytes_and_quality(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("quantized plans cost a little perplexity and save bytes on the wire. " * 40)
    results, outs = {}, {}
    for name, flags in {"exact": [], "codec": ["--codec", "tabq", "--codec-eps", "0.05", "--codec-entropy", "none"],
                        "w4": ["--device-bits", "4", "--cloud-bits", "8", "--device-group", "32", "--kv-bits", "8"]}.items():
        out_json = tmp_path / f"{name}.json"
        code, out, err = run(capsys, "eval", "--model", "tiny-random", "--split", "2", "--text", str(text), "--windows", "2",
                             "--window-size", "256", "--json", str(out_json), *flags)
        assert code == 0, err
        results[name] = json.loads(out_json.read_text())
        outs[name] = out
    d = 64
    assert results["codec"]["bytes_per_token"] < 2 * d < results["exact"]["bytes_per_token"]
    assert "smaller than fp16" in outs["codec"]
    assert "2.00x larger than fp16" in outs["exact"]  # the exact link is float32
    assert results["w4"]["plan"]["device_weights"]["bits"] == 4 and results["w4"]["plan"]["kv_bits"] == 8
    for name in ("codec", "w4"):
        assert results[name]["perplexity"] != results["exact"]["perplexity"]
        assert abs(results[name]["perplexity"] / results["exact"]["perplexity"] - 1) < 0.5


def test_eval_gptq_needs_disjoint_calibration(capsys, tiny_ckpt):
    from splitlm import evaluate

    # one window more than fit before the calibration windows: the text has them, but they overlap
    windows = evaluate.eval_windows_limit(tiny_ckpt.tokenizer()) + 1
    code, _, err = run(capsys, "eval", "--model", "tiny-random", "--windows", str(windows), "--device-bits", "4",
                       "--device-method", "gptq")
    assert code == 2
    assert f"{windows} evaluation windows would overlap the last {evaluate.CALIBRATION_WINDOWS} calibration windows" in err


def test_verbose_turns_on_splitlm_logging_not_the_libraries(capsys):
    import logging

    ours = logging.getLogger("splitlm")
    try:
        assert main(["-v", "models"]) == 0
        assert ours.getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("onnxscript").getEffectiveLevel() > logging.DEBUG  # -v alone: not the exporter's chatter
    finally:
        ours.setLevel(logging.NOTSET)


def test_serve_writes_the_port_it_listens_on_to_port_file(artifacts, tmp_path):
    """serve --port 0 --port-file F --dtype bfloat16, a real server process: F holds the bound port once it listens, and a
    client connects to it; the tail computes in bfloat16."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitlm.profiler.probes import child_env

    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "serve", "--artifacts", str(artifacts[1].cloud_dir.parent),
                             "--port", "0", "--port-file", str(port_file), "--dtype", "bfloat16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, f"serve exited: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no --port-file after 120 s"
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert 0 < port < 65536 and list(tmp_path.iterdir()) == [port_file]  # the temporary file was renamed onto it
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        import splitlm

        with splitlm.Device(artifacts[1].device_dir.parent, server=f"127.0.0.1:{port}") as device:
            assert len(device.generate("x", 3).token_ids) == 3
    finally:
        proc.terminate()
        proc.wait(10)
    log = proc.stderr.read()  # without -v, serve still logs a line per session opened and closed
    assert "event=session_open" in log and re.search(r"event=session_close .* tokens=3 ttft_ms=\d+ tokens_per_s=", log), log
    assert "in bfloat16" in log, log  # the tail's start line


def test_serve_refuses_a_port_file_it_cannot_write_before_starting(capsys, tmp_path, monkeypatch, artifacts):
    import splitlm.cloud.service as service
    import splitlm.cloud.tail as tail

    def never(*args, **kwargs):
        raise AssertionError("started before checking --port-file")

    monkeypatch.setattr(service, "start_server", never)
    monkeypatch.setattr(tail, "TailRunner", never)
    root = str(artifacts[1].cloud_dir.parent)
    assert_one_line_error(capsys, ("serve", "--artifacts", root, "--port", "0", "--port-file", str(tmp_path / "missing" / "port")),
                          r"splitlm serve: error: --port-file .*missing/port: directory .*missing does not exist")
    assert_one_line_error(capsys, ("serve", "--artifacts", root, "--port", "0", "--port-file", str(tmp_path)),
                          r"--port-file .* is a directory; give a file name")


def test_every_flag_has_help_and_there_is_a_version(capsys):
    import argparse

    from splitlm import __version__
    from splitlm.cli import _parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.option_strings and not action.help:
                missing.append(f"{' '.join(path) or 'splitlm'} {'/'.join(action.option_strings)}")

    walk(_parser(), [])
    assert not missing, f"flags without help text: {missing}"
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"splitlm {__version__}"


def test_idle_cores_counts_cores_this_process_may_use():
    import os

    from splitlm.cli.flags import idle_cores

    n = idle_cores(0.05)
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_a_long_prompt_shows_its_prefill_progress(capsys, monkeypatch):
    import splitlm.cli.run as run_module

    monkeypatch.setattr(run_module, "PREFILL_PROGRESS_FROM", 20)
    code, out, err = run(capsys, "generate", "--model", "tiny-random", "--split", "2", "--prompt", "a longer prompt " * 18,
                         "--max-tokens", "2")
    assert code == 0, err
    total = int(re.search(r"\[prefill\] \d+/(\d+) prompt positions", err).group(1))
    assert total > 128 and "[prefill] 128/" in err and f"[prefill] {total}/{total} prompt positions\n" in err

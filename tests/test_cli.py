"""The `splitlm` command, run in-process on the tiny model."""

import json

import pytest

from splitlm.cli import main


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
    (("generate", "--model", "tiny-random", "--prompt", "x", "--max-tokens", "0"), "max tokens"),
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
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


def test_demo_runs_end_to_end_on_tiny_model(capsys):
    code, out, _ = run(capsys, "demo", "--model", "tiny-random", "--max-tokens", "5")
    assert code == 0 and "time to first token" in out and "over gRPC on 127.0.0.1:" in out
    assert "bytes up per position" in out
    code, out2, _ = run(capsys, "demo", "--model", "tiny-random", "--max-tokens", "5")  # export reused
    assert code == 0


def test_eval_plan_flags_report_bytes_and_quality(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("quantized plans cost a little perplexity and save bytes on the wire. " * 40)
    results = {}
    for name, flags in {"exact": [], "codec": ["--codec", "tabq", "--codec-eps", "0.05"],
                        "w4": ["--device-bits", "4", "--cloud-bits", "8", "--device-group", "32", "--kv-bits", "8"]}.items():
        out_json = tmp_path / f"{name}.json"
        code, out, err = run(capsys, "eval", "--model", "tiny-random", "--split", "2", "--text", str(text), "--windows", "2",
                             "--window-size", "256", "--json", str(out_json), *flags)
        assert code == 0, err
        results[name] = json.loads(out_json.read_text())
    d = 64
    assert results["codec"]["bytes_per_token"] < 2 * d < results["exact"]["bytes_per_token"]
    assert "smaller than fp16" in out
    assert results["w4"]["plan"]["device_weights"]["bits"] == 4 and results["w4"]["plan"]["kv_bits"] == 8
    for name in ("codec", "w4"):
        assert results[name]["perplexity"] != results["exact"]["perplexity"]
        assert abs(results[name]["perplexity"] / results["exact"]["perplexity"] - 1) < 0.5


def test_eval_gptq_needs_disjoint_calibration(capsys):
    code, _, err = run(capsys, "eval", "--model", "tiny-random", "--windows", "9999", "--device-bits", "4",
                       "--device-method", "gptq")
    assert code == 2 and ("overlap" in err or "windows of 512" in err)


def test_verbose_turns_on_splitlm_logging_not_the_libraries(capsys):
    import logging

    ours = logging.getLogger("splitlm")
    try:
        assert main(["-v", "models"]) == 0
        assert ours.getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("onnxscript").getEffectiveLevel() > logging.DEBUG  # -v alone: not the exporter's chatter
    finally:
        ours.setLevel(logging.NOTSET)

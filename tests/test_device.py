"""The device side: ONNX export of the head, parity with torch, and the torch-free runtime."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from splitlm.errors import ConfigError, ModelLoadError, ParityError
from splitlm.partition.plan import Plan
from splitlm.quantize.config import CodecConfig, WeightQuant

PRECISIONS = {"fp32": WeightQuant(16), "int8": WeightQuant(8, 32), "int4": WeightQuant(4, 32)}


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    """Exports of the tiny model at ℓ ∈ {1, L/2, L} × {fp32, int8, int4}."""
    from splitlm.export import export_artifacts

    L = tiny_ckpt.spec.num_layers
    out = {}
    for split in (1, L // 2, L):
        for name, wq in PRECISIONS.items():
            plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, split, device_weights=wq,
                        cloud_weights=WeightQuant(8, 64), codec=CodecConfig("tabq", entropy="none", error_budget=0.01), max_seq_len=256,
                        prefill_chunk=16)
            root = tmp_path_factory.mktemp(f"export-{split}-{name}")
            out[split, name] = (plan, export_artifacts(tiny_ckpt, plan, root, progress=False, accuracy_level=0))
    return out


@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_onnx_head_matches_torch_head(tiny_ckpt, exports, split, precision):
    from splitlm.export import check_parity
    from splitlm.export.build import PARITY_TOL

    plan, result = exports[split, precision]
    worst = check_parity(tiny_ckpt, plan, result.device_dir, prompts=2)
    assert set(worst) >= {"hidden_states" if split < 4 else "logits"}
    # accuracy_level 0 computes in fp32: even a quantized head meets the fp32 contract
    assert max(worst.values()) <= PARITY_TOL["fp32"]


@pytest.mark.parametrize("split", [1, 4])
def test_graph_names_are_the_model_descriptions(tiny_ckpt, exports, split):
    import json

    import onnx
    import onnxruntime as ort

    from splitlm.model import names

    plan, result = exports[split, "int4"]
    assert json.loads((result.device_dir / "manifest.json").read_text())["graph"] == "gqa"
    model = onnx.load(str(result.device_dir / names.HEAD_FILE))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    expected_in = [names.INPUT_IDS, names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH]
    expected_out = [names.LOGITS if split == 4 else names.HIDDEN_STATES]
    for i in range(split):
        expected_in += [names.past_key(i), names.past_value(i)]
        expected_out += [names.present_key(i), names.present_value(i)]
    expected_in += [names.LOGIT_ROWS] if split == 4 else []
    assert inputs == expected_in and outputs == expected_out
    ops = [n.op_type for n in model.graph.node]
    # one packed q/k/v, o, gate, up and down per layer; the embedding quantized with the blocks
    assert ops.count("MatMulNBits") == 5 * split and ops.count("GroupQueryAttention") == split
    assert ops.count("GatherBlockQuantized") == 1 and "Concat" not in ops
    # plain onnxruntime, only the documented inputs: a 3-token prompt into K/V buffers of max_seq_len positions
    sess = ort.InferenceSession(str(result.device_dir / names.HEAD_FILE), providers=["CPUExecutionProvider"])
    spec = tiny_ckpt.spec
    feed = {names.INPUT_IDS: np.array([[5, 6, 7]]), names.SEQLENS_K: np.array([2], np.int32),
            names.TOTAL_SEQUENCE_LENGTH: np.array(3, np.int32)}
    if split == 4:
        feed[names.LOGIT_ROWS] = np.array([2])
    for i in range(split):
        feed[names.past_key(i)] = feed[names.past_value(i)] = np.zeros((1, spec.num_kv_heads, plan.max_seq_len, spec.head_dim), np.float32)
    out = sess.run(None, feed)
    assert out[0].shape == ((1, 1, spec.vocab_size) if split == 4 else (1, 3, spec.hidden_size))
    assert out[1].shape == (1, spec.num_kv_heads, plan.max_seq_len, spec.head_dim)
    assert np.abs(out[1][:, :, :3]).sum() > 0 and not out[1][:, :, 3:].any()


def test_kv_is_written_in_place_and_rolls_back_by_length(tiny_ckpt, exports):
    """The runtime's K/V buffers are the graph's past and present at once: a step writes its positions
    into them (no copy, no concatenation), and a shorter length is a rollback."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    plan, result = exports[2, "int4"]
    head = DeviceHead(HeadSession(result.device_dir))
    before = [b.ctypes.data for b in head.buffers]
    first = head.step([3, 4, 5, 6])
    head.step([7])
    assert [b.ctypes.data for b in head.buffers] == before and head.length == 5
    # a one-row step runs as two (DeviceHead.rows_alike): the second's K/V land at position 5, which the next step writes
    assert all(b[:, :, :6].any() and b[:, :, 5].any() and not b[:, :, 6:].any() for b in head.buffers)
    assert head.kv_bytes() == 5 * tiny_ckpt.spec.kv_bytes_per_token(2, 32)
    again = DeviceHead(HeadSession(result.device_dir))
    again.step([3, 4, 5])
    again.rewind(2)  # roll the last position back, then feed it again: the same outputs
    np.testing.assert_allclose(again.step([5, 6]), first[2:], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def int8_compute_export(tiny_ckpt, tmp_path_factory):
    """The tiny model's int4 head at split 2 with MatMulNBits' int8 compute (accuracy level 4), as exports ship."""
    from splitlm.export import export_artifacts

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, device_weights=WeightQuant(4, 32),
                codec=CodecConfig("fp16"), max_seq_len=64, prefill_chunk=16)
    return plan, export_artifacts(tiny_ckpt, plan, tmp_path_factory.mktemp("int8-compute"), progress=False, accuracy_level=4)


@pytest.mark.parametrize("compute", ["fp32", "int8"])
def test_rows_of_a_split_head_do_not_depend_on_their_call(tiny_ckpt, exports, int8_compute_export, compute):
    """A split head's outputs for a position are the same bit for bit whether it ran alone, in a call of several
    rows, in a prefill chunk's one-row remainder or in the buffer's last position (MatMulNBits at int8 compute runs
    one row another way than several, so a one-row call runs as two): a speculative step's rows, computed in one
    call, are those of decoding one at a time."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    plan, result = exports[2, "int4"] if compute == "fp32" else int8_compute_export
    session = HeadSession(result.device_dir)
    head = DeviceHead(session)
    assert session.rows_alike and head.rows_alike
    ids = [(5 * i) % 50 + 3 for i in range(plan.prefill_chunk + 1)]  # two prefill chunks, the second of one row
    together = head.step(ids)
    head.reset()
    alone = np.concatenate([head.step([i]) for i in ids])
    head.reset()
    grouped = np.concatenate([head.step(ids[:1]), head.step(ids[1:3]), head.step_each(ids[3:])])
    np.testing.assert_array_equal(alone, together)
    np.testing.assert_array_equal(grouped, together)
    # the buffer's last position: no room for the second row after it, so the one before runs again, to the same K/V
    n = plan.max_seq_len
    prompt = [(7 * i) % 50 + 3 for i in range(n)]
    head.reset()
    full = head.step(prompt)
    head.rewind(n - 1)
    before = [b.copy() for b in head.presents()]
    np.testing.assert_array_equal(head.step(prompt[-1:]), full[-1:])
    assert head.length == n and head.ids == prompt
    for a, b in zip(before, head.presents()):
        np.testing.assert_array_equal(a, b[:, :, :n - 1])


def test_parity_failure_names_the_tensor(tiny_ckpt, exports):
    from splitlm.export import check_parity

    plan, result = exports[2, "int4"]
    other = plan.replace(device_weights=WeightQuant(8, 32))
    with pytest.raises(ParityError, match=r"(hidden_states|present_\w+\.\d): ONNX differs from torch by .* tolerance"):
        check_parity(tiny_ckpt, other, result.device_dir, prompts=1)


def test_device_head_plus_exported_tail_equals_in_process_split(tiny_ckpt, exports):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession, generate_split
    from splitlm.local import LocalSplit

    plan, result = exports[2, "int4"]
    prompt = tiny_ckpt.tokenizer().encode("the device talks to the cloud " * 2).ids
    tail = TailRunner(result.cloud_dir).new_session()
    got = generate_split(HeadSession(result.device_dir), tail.send, prompt, 16)
    ref = LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 16)
    assert got.token_ids == ref.token_ids
    assert 0 < got.link_bytes < (len(prompt) + 15) * 2 * tiny_ckpt.spec.hidden_size


def test_device_only_generation_runs_without_torch(tiny_ckpt, exports):
    plan, result = exports[4, "int4"]
    _, split_result = exports[2, "int8"]
    prompt = tiny_ckpt.tokenizer().encode("no torch here").ids
    from splitlm.local import LocalSplit

    expected = LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 10).token_ids
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ImportError("torch is not available on the device")
        sys.meta_path.insert(0, NoTorch())
        from splitlm.device.runtime import DeviceHead, HeadSession, generate_device_only
        out = generate_device_only(HeadSession({str(result.device_dir)!r}), {prompt!r}, 10)
        head = DeviceHead(HeadSession({str(split_result.device_dir)!r}))
        frame = head.encode(head.step({prompt!r}))
        assert "torch" not in sys.modules and len(frame) > 0
        print(out.token_ids)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(expected)


def test_cli_export_check_and_generate(capsys, tmp_path):
    from splitlm.cli import main

    out = tmp_path / "art"
    assert main(["export", "--model", "tiny-random", "--split", "3", "--device-bits", "4", "--device-group", "32",
                 "--codec", "fp16", "--out", str(out), "--check", "--segment-cuts", "1,2"]) == 0
    text = capsys.readouterr().out
    assert "parity:" in text and "ok" in text and "in 3 segments" in text
    assert main(["export", "--model", "tiny-random", "--split", "3", "--out", str(tmp_path / "bad"), "--segment-cuts", "3"]) == 2
    assert "--segment-cuts [3] are not inside the head's layers (0, 3)" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(out), "--prompt", "abc", "--max-tokens", "6"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("abc") and "[split 3/4]" in cap.err and "B/token on the link" in cap.err


def test_cli_defaults_give_a_quantized_device_only_head_an_8bit_lm_head(capsys, tmp_path):
    import json

    from splitlm.cli import main

    for split, flags, expect in ((4, [], 8), (4, ["--lm-head-bits", "16"], 16), (2, [], 16)):
        out = tmp_path / f"e{split}{len(flags)}"
        assert main(["export", "--model", "tiny-random", "--split", str(split), "--device-bits", "4", "--out", str(out), *flags]) == 0
        plan = json.loads((out / "device" / "plan.json").read_text())
        assert plan["lm_head_bits"] == expect and plan["device_weights"]["method"] == "rtn"  # the tiny model has no source blocks
    capsys.readouterr()


def test_missing_artifacts_are_clear_errors(capsys, tmp_path):
    from splitlm.cli import main

    assert main(["generate", "--artifacts", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no head.onnx" in capsys.readouterr().err


def _one_line_error(capsys, argv, message):
    import re

    from splitlm.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


@pytest.fixture
def damaged(exports, tmp_path):
    """A copy of the split-2 int8 export, to damage."""
    import shutil

    shutil.copytree(exports[2, "int8"][1].device_dir.parent, tmp_path / "art")
    return tmp_path / "art"


def test_missing_or_truncated_files_are_named_not_onnxruntime_tracebacks(capsys, damaged):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession

    data = damaged / "device" / "head.onnx.data"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    with pytest.raises(ModelLoadError, match=rf"head.onnx.data has {size // 2} bytes, the manifest says {size}: truncated"):
        HeadSession(damaged / "device")
    _one_line_error(capsys, ["generate", "--artifacts", str(damaged), "--prompt", "x"],
                    rf"art/device/head.onnx.data has {size // 2} bytes, the manifest says {size}")
    data.unlink()
    _one_line_error(capsys, ["generate", "--artifacts", str(damaged), "--prompt", "x"],
                    r"art/device/head.onnx.data is missing \(the manifest lists it\)")
    tail = damaged / "cloud" / "tail.safetensors"
    tail.write_bytes(tail.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"tail.safetensors has 100 bytes"):
        TailRunner(damaged / "cloud")
    _one_line_error(capsys, ["serve", "--artifacts", str(damaged), "--port", "0"], r"art/cloud/tail.safetensors has 100 bytes")


def test_sha256_is_checked_on_request(capsys, damaged):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession

    for name in ("device/head.onnx.data", "cloud/tail.safetensors"):
        path = damaged / name
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF  # same size, other content: only the hash can tell
        path.write_bytes(bytes(raw))
    HeadSession(damaged / "device")  # sizes match: loads
    with pytest.raises(ModelLoadError, match=r"head.onnx.data does not match the sha256 in its manifest"):
        HeadSession(damaged / "device", verify=True)
    with pytest.raises(ModelLoadError, match=r"tail.safetensors does not match the sha256"):
        TailRunner(damaged / "cloud", verify=True, warm_up=False)
    _one_line_error(capsys, ["generate", "--artifacts", str(damaged), "--prompt", "x", "--verify"],
                    r"art/device/head.onnx.data does not match the sha256")
    _one_line_error(capsys, ["serve", "--artifacts", str(damaged), "--port", "0", "--verify"],
                    r"art/cloud/tail.safetensors does not match the sha256")


def test_missing_tokenizer_is_named(capsys, damaged, tmp_path):
    from splitlm.device.runtime import load_tokenizer

    (damaged / "device" / "tokenizer.json").unlink()
    _one_line_error(capsys, ["generate", "--artifacts", str(damaged), "--prompt", "x"],
                    r"art/device/tokenizer.json is missing")
    with pytest.raises(ModelLoadError, match=r"tokenizer file .*art/device/tokenizer.json is missing"):
        load_tokenizer(damaged / "device")
    (damaged / "device" / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ModelLoadError, match=r"tokenizer file .*art/device/tokenizer.json is unreadable"):
        load_tokenizer(damaged / "device")


def test_a_side_folder_given_as_the_export_is_named(capsys, exports):
    root = exports[2, "int8"][1].device_dir.parent
    _one_line_error(capsys, ["generate", "--artifacts", str(root / "device"), "--prompt", "x"],
                    rf"{root}/device looks like the device folder of an export; pass its parent {root}$")
    _one_line_error(capsys, ["serve", "--artifacts", str(root / "cloud"), "--port", "0"],
                    rf"{root}/cloud looks like the cloud folder of an export; pass its parent {root}$")
    device_only = exports[4, "int8"][1].device_dir.parent
    _one_line_error(capsys, ["serve", "--artifacts", str(device_only), "--port", "0"],
                    rf"{device_only} has no cloud/ folder: it is a device-only export")


def test_generate_refuses_flags_that_the_export_fixes(capsys, exports, tmp_path):
    from splitlm.cli import main

    plan, result = exports[2, "int8"]
    root = str(result.device_dir.parent)
    _one_line_error(capsys, ["generate", "--artifacts", root, "--split", "3", "--prompt", "x"],
                    r"--split 3: the export in .* splits at layer 2, which fixes the split")
    _one_line_error(capsys, ["generate", "--artifacts", root, "--model", "smollm2-135m", "--prompt", "x"],
                    r"--model smollm2-135m: the export in .* is of tiny-random")
    plan.replace(split_layer=1).save(tmp_path / "other.json")
    _one_line_error(capsys, ["generate", "--artifacts", root, "--plan", str(tmp_path / "other.json"), "--prompt", "x"],
                    r"--plan .*other.json \(plan \w+\) is not the plan of the export")
    device_only = str(exports[4, "int8"][1].device_dir.parent)
    _one_line_error(capsys, ["generate", "--artifacts", device_only, "--server", "127.0.0.1:1", "--prompt", "x"],
                    r"--server: the export in .* is device-only \(split 4/4\)")
    (tmp_path / "ca.pem").write_text("not a certificate")
    _one_line_error(capsys, ["generate", "--artifacts", root, "--server", "127.0.0.1:1", "--tls-ca", str(tmp_path / "ca.pem"),
                             "--prompt", "x"], r"TLS root certificate file .*ca.pem' is not a PEM certificate")
    _one_line_error(capsys, ["generate", "--artifacts", root, "--server", "localhost", "--prompt", "x"],
                    r"server address 'localhost' is not HOST:PORT")
    plan.save(tmp_path / "same.json")
    assert main(["generate", "--artifacts", root, "--split", "2", "--model", "tiny-random", "--plan", str(tmp_path / "same.json"),
                 "--prompt", "x", "--max-tokens", "2"]) == 0  # the same values are not ignored: accepted
    assert "[split 2/4]" in capsys.readouterr().err


def test_traced_graph_is_the_fallback_and_agrees(tiny_ckpt, exports, tmp_path):
    """Models GroupQueryAttention cannot run get the torch-traced graph (past in, past + new out): same
    tokens as the GroupQueryAttention head; a quantized KV cache or segments need the latter."""
    import json

    from splitlm.device.runtime import HeadSession, generate_device_only
    from splitlm.errors import ExportError
    from splitlm.export import check_parity, export_artifacts
    from splitlm.export.graph import gqa_unsupported
    from splitlm.model.convert import tiny_spec
    from splitlm.model.spec import RopeScaling

    assert "dynamic NTK" in gqa_unsupported(tiny_spec(rope_scaling=RopeScaling(kind="dynamic", factor=2.0)))
    assert "multiple of 16" in gqa_unsupported(tiny_spec(head_dim=24))
    assert gqa_unsupported(tiny_spec()) is None
    plan, gqa = exports[4, "fp32"]
    traced = export_artifacts(tiny_ckpt, plan, tmp_path / "traced", progress=False, graph="traced")
    assert json.loads((traced.device_dir / "manifest.json").read_text())["graph"] == "traced"
    assert max(check_parity(tiny_ckpt, plan, traced.device_dir, prompts=1).values()) < 1e-4
    prompt = tiny_ckpt.tokenizer().encode("the old graph").ids
    assert (generate_device_only(HeadSession(traced.device_dir), prompt, 8).token_ids
            == generate_device_only(HeadSession(gqa.device_dir), prompt, 8).token_ids)
    with pytest.raises(ExportError, match="quantized KV cache needs the GroupQueryAttention graph"):
        export_artifacts(tiny_ckpt, plan.replace(kv_bits=8), tmp_path / "t8", progress=False, graph="traced")
    with pytest.raises(ExportError, match="segments needs the GroupQueryAttention graph"):
        export_artifacts(tiny_ckpt, plan, tmp_path / "tseg", progress=False, graph="traced", segment_cuts=(2,))


def test_head_in_segments_runs_any_cut_and_releases_the_rest(tiny_ckpt, exports, tmp_path):
    """A head cut at layers 1 and 3 computes what the whole graph computes; released to layer 3 or 1 it
    outputs the hidden states at that layer (what a head exported with that split outputs) and holds
    the K/V of those layers only."""
    import json

    from splitlm.device.runtime import DeviceHead, HeadSession
    from splitlm.export import export_artifacts
    from splitlm.model import names

    plan, whole = exports[4, "int4"]
    cut = export_artifacts(tiny_ckpt, plan, tmp_path / "cut", progress=False, accuracy_level=0, segment_cuts=(3, 1))
    assert json.loads((cut.device_dir / "manifest.json").read_text())["segments"] == [[0, 1], [1, 3], [3, 4]]
    assert [(cut.device_dir / names.segment_file(k)).is_file() for k in range(3)] == [True] * 3
    session = HeadSession(cut.device_dir)
    assert session.cuts == [1, 3, 4]
    head, ref = DeviceHead(session), DeviceHead(HeadSession(whole.device_dir))
    prompt, more = list(range(3, 30)), [41, 42]
    for ids in (prompt, more[:1], more[1:]):
        np.testing.assert_allclose(head.step(ids), ref.step(ids), rtol=1e-4, atol=1e-5)
    per_layer = head.kv_bytes() // 4
    for layer in (3, 1):
        head.release(layer)
        assert head.stop == layer and len(head.buffers) == 2 * layer and head.kv_bytes() == layer * per_layer
        other = export_artifacts(tiny_ckpt, plan.replace(split_layer=layer), tmp_path / f"split{layer}", progress=False,
                                 accuracy_level=0)
        expect = DeviceHead(HeadSession(other.device_dir))
        expect.step(prompt + more)
        head.rewind(len(prompt) + 1)
        expect.rewind(len(prompt) + 1)
        np.testing.assert_allclose(head.step(more[1:]), expect.step(more[1:]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="can stop at layers"):
        head.release(3)  # released already


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_quantized_plan_device_matches_in_process(tiny_ckpt, tmp_path, bits):
    """A quantized cache on the device holds codes only (int8, or two 4-bit codes a byte): a quarter or
    an eighth of the float cache, with the same outputs as the torch head that models it, and the
    same greedy tokens as the in-process split."""
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession, generate_split
    from splitlm.export import check_parity, export_artifacts
    from splitlm.local import LocalSplit

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, kv_bits=bits, codec=CodecConfig("fp32"), prefill_chunk=8,
                max_seq_len=128)
    result = export_artifacts(tiny_ckpt, plan, tmp_path, progress=False)
    assert max(check_parity(tiny_ckpt, plan, result.device_dir, prompts=2).values()) < 1e-4
    head = DeviceHead(HeadSession(result.device_dir))
    assert {b.dtype for b in head.buffers} == {np.dtype(np.int8 if bits == 8 else np.uint8)}
    head.step(list(range(3, 40)))
    assert head.kv_bytes() == 37 * tiny_ckpt.spec.kv_bytes_per_token(2, bits)
    prompt = tiny_ckpt.tokenizer().encode("a quantized cache on the device").ids
    got = generate_split(HeadSession(result.device_dir), TailRunner(result.cloud_dir).new_session().send, prompt, 12)
    ref = LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 12)
    assert got.token_ids == ref.token_ids


def test_quantized_lm_head_and_int8_compute_export(tiny_ckpt, tmp_path):
    from splitlm.device.runtime import HeadSession, generate_device_only
    from splitlm.export import check_parity, export_artifacts
    from splitlm.export.build import PARITY_TOL
    from splitlm.local import LocalSplit

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 4, device_weights=WeightQuant(4, 32), lm_head_bits=8,
                codec=CodecConfig("fp16"))
    exact = export_artifacts(tiny_ckpt, plan, tmp_path / "a", progress=False, accuracy_level=0)
    check_parity(tiny_ckpt, plan, exact.device_dir, prompts=1)
    prompt = tiny_ckpt.tokenizer().encode("lm head").ids
    assert generate_device_only(HeadSession(exact.device_dir), prompt, 8).token_ids == \
        LocalSplit(tiny_ckpt, plan=plan).generate(prompt, 8).token_ids
    fast = export_artifacts(tiny_ckpt, plan, tmp_path / "b", progress=False, accuracy_level=4)
    worst = check_parity(tiny_ckpt, plan, fast.device_dir, prompts=1)
    assert max(worst.values()) <= PARITY_TOL["int8-compute"]


def test_exported_tail_with_quantized_lm_head_round_trips(tiny_ckpt, tmp_path):
    import torch

    from splitlm.cloud.tail import TailRunner
    from splitlm.local import LocalSplit
    from splitlm.quantize.apply import load_stage, save_stage
    from splitlm.quantize.weights import QuantLinear

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, cloud_weights=WeightQuant(4, 32), lm_head_bits=8,
                codec=CodecConfig("fp32"))
    tail = LocalSplit(tiny_ckpt, plan=plan).tail
    save_stage(tail, tmp_path / "tail.safetensors")
    again = load_stage(tiny_ckpt.spec, tmp_path / "tail.safetensors")
    assert isinstance(again.lm_head, QuantLinear) and again.lm_head.bits == 8
    h = torch.randn(1, 7, tiny_ckpt.spec.hidden_size)
    with torch.inference_mode():
        assert torch.equal(tail(h), again(h))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="not a saved stage"):
        load_stage(tiny_ckpt.spec, tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match="has no tail.safetensors"):
        TailRunner(tmp_path / "nothing")


def test_sequence_length_errors_say_what_to_do(tiny_ckpt, tmp_path, capsys):
    from splitlm.cli import main
    from splitlm.export import export_artifacts

    long_plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, codec=CodecConfig("fp16"), max_seq_len=2048)
    root = export_artifacts(tiny_ckpt, long_plan, tmp_path / "long", progress=False).device_dir.parent
    assert main(["generate", "--artifacts", str(root), "--prompt", "x", "--max-tokens", "2"]) == 2
    assert "past the 1024 the model was trained for; re-partition with --max-seq-len 1024" in capsys.readouterr().err
    short_plan = long_plan.replace(max_seq_len=16)
    root = export_artifacts(tiny_ckpt, short_plan, tmp_path / "short", progress=False).device_dir.parent
    assert main(["generate", "--artifacts", str(root), "--prompt", "a prompt longer than sixteen tokens", "--max-tokens", "2"]) == 2
    assert "shorten the prompt, or re-partition with --max-seq-len" in capsys.readouterr().err


def test_a_tail_computes_in_the_dtype_asked_for(tiny_ckpt, exports):
    """TailRunner(dtype="bfloat16") (`serve --dtype`): the parameters, the decoded frames and the K/V are bfloat16,
    the logits stay within bfloat16's rounding of the float32 tail's on the same frames, and the tokens come back as
    float32 logits; float16 on a CPU and an unknown type are refused."""
    import torch

    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import DeviceHead, HeadSession
    from tests.tolerances import TOL

    plan, result = exports[2, "int4"]
    head = DeviceHead(HeadSession(result.device_dir))
    prompt = tiny_ckpt.tokenizer().encode("the cloud computes in half precision " * 3).ids
    frames = [head.encode(h) for h, _ in head.chunks(prompt)] + [head.encode(head.step([7]))]
    ref = TailRunner(result.cloud_dir, device="cpu").new_session()
    half = TailRunner(result.cloud_dir, dtype="bfloat16", device="cpu").new_session()
    assert {p.dtype for p in half.runner.stage.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ref.runner.stage.parameters()} == {torch.float32}
    for frame in frames:
        a, b = ref.logits(frame), half.logits(frame)
        assert b.dtype == torch.float32 and a.shape == b.shape
        rel = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))
        assert 0 < rel <= TOL["bf16_tail_logits_rel"], rel
    k, v = half.cache.read(plan.split_layer)
    assert k.dtype == v.dtype == torch.bfloat16 and k.shape[2] == len(prompt) + 1
    assert isinstance(half.next_token(head.encode(head.step([9]))), int)
    # the batcher's path: a frame of 3 rows, and the same rows as frames of 1 and 2, give the same logits bit for bit
    assert half.runner.rows_alike
    rows = head.step([11, 12, 13])
    together, apart = half.runner.new_session(), half.runner.new_session()
    for frame in frames:
        together.logits(frame)
        apart.logits(frame)
    one = together.logits(head.encode(rows))
    assert torch.equal(one, torch.cat([apart.logits(head.encode(rows[:1])), apart.logits(head.encode(rows[1:]))]))
    for bad, match in (("float16", "float16 runs on CUDA only"), ("int8", "the tail computes in one of float32, bfloat16")):
        with pytest.raises(ConfigError, match=match):
            TailRunner(result.cloud_dir, dtype=bad, device="cpu", warm_up=False)


def test_lone_rows_run_padded_where_a_one_row_matmul_rounds_otherwise():
    """`row_floor` finds the rows from which a tail's matmuls give a row the same numbers in a call of any size, and
    `_pad_rows` runs fewer rows padded to them. A bfloat16 matmul of SmolLM2's down projection (1536 -> 576) on a
    CPU with AVX512-BF16 (oneDNN) rounds a lone row otherwise than one among others, at a few values of 64 rows:
    there the floor is 2, and padded lone rows equal those of one call of all 64, bit for bit."""
    from pathlib import Path

    import torch

    from splitlm.cloud.tail import _pad_rows, row_floor

    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 576, bias=False).to(torch.bfloat16)
    x = torch.randn(64, 1536).to(torch.bfloat16)
    whole = lin(x)
    lone = torch.cat([lin(x[i:i + 1]) for i in range(64)])
    floor = row_floor(torch.nn.Sequential(lin), torch.bfloat16)
    assert floor in (1, 2) and (floor > 1 or torch.equal(lone, whole))
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        assert floor == 2 and not torch.equal(lone, whole)
    _pad_rows(lin, {n: floor for n in range(1, floor)})
    assert torch.equal(torch.cat([lin(x[i:i + 1]) for i in range(64)]), whole)
    assert torch.equal(lin(x[None, :1]), whole[None, :1]) and lin(x[:0]).shape == (0, 576)  # any leading shape, no rows


def test_float32_calls_of_two_or_three_rows_run_as_four_on_mkl():
    """On a CPU with MKL a float32 matmul of 2 or 3 rows costs about 2 or 3 of one row, and one of 4 rows less
    (`bench/tail_rows.py`): `row_padding` pads them to 4, and a padded call's rows are those of a 4-row call, bit for bit."""
    import torch

    from splitlm.cloud.tail import _pad_rows, row_padding

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=False)
    pad = row_padding(torch.nn.Sequential(lin), torch.float32)
    if not torch.backends.mkl.is_available():
        assert pad == {}
        return
    assert pad == {2: 4, 3: 4}
    x = torch.randn(4, 576)
    four = torch.nn.functional.linear(x, lin.weight)
    _pad_rows(lin, pad)
    with torch.inference_mode():
        assert torch.equal(lin(x[:2]), four[:2]) and torch.equal(lin(x[None, :3]), four[None, :3])
        assert torch.equal(lin(x[:1]), torch.nn.functional.linear(x[:1], lin.weight))  # a lone row stays alone

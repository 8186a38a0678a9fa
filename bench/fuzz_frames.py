"""Coverage-guided fuzzing of the activation frame parser and decoders (DESIGN.md §4) and of the K/V
codec's decoder (§6), with atheris.

    .venv/bin/python bench/fuzz_frames.py [--kv] [-atheris_runs=N] [-max_total_time=S] [libFuzzer flags] [corpus_dir ...]

Each input goes through `codec.parse_frame`, `codec.decode` on the numpy and the torch backend,
and the cloud's batched frame decoder (`kernels.frame_decode`'s torch reference; `codec.decode_many`
for ans frames, as the tail routes them), ans frames against a basis fitted here. The
contract: every decoder either decodes the input or raises CodecError, nothing else; they all
agree on which; what decodes is float32, finite, of the header's shape (T, d), and the same bit
for bit from every decoder (ans frames: equal to float32 rounding, their basis product runs in each
backend's BLAS). With --kv each input is a K/V codec payload (`KVChecker`): it decodes
to finite float32 of the shape asked for, or raises CodecError. A broken contract is a crash: libFuzzer saves the input as
crash-<sha1> (see -artifact_prefix) and exits non-zero. Without a corpus directory the fuzzer
starts from encoder-made seed frames of every kind and row form. At exit it prints a summary:
executions, seconds, inputs decoded, rejections grouped by message. (libFuzzer ends its -runs and
-max_total_time with C's exit(), past Python's atexit; so -runs=N is passed on as -atheris_runs=N,
and the time limit is kept here.)

`FrameChecker` and `seed_frames` are also what tests/test_codec.py's bounded mutation test runs.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def message_kind(exc: Exception) -> str:
    """An error message with its numbers taken out: rejections of one kind count together."""
    return re.sub(r"(?<![A-Za-z\d])-?\d+(\.\d+)?", "N", str(exc))[:90]


class FrameChecker:
    """Checks the frame contract on one input at a time, and counts the outcomes.

    Imports splitlm when built, so that the fuzzer can build it under atheris' instrumentation."""

    def __init__(self) -> None:
        from splitlm.errors import CodecError
        from splitlm.kernels.frame_decode import decode_frames
        from splitlm.quantize import codec

        self.codec, self.error = codec, CodecError
        bases = {0: fuzz_basis()}

        def batched(buf: bytes) -> np.ndarray:
            lay = codec.parse_frame(buf)
            if lay.kind == "ans":
                return codec.decode_many([buf], "torch", [lay], bases=bases)[0].numpy()
            return decode_frames([buf], "cpu", "reference", layouts=[lay])[0].numpy()

        self.decoders = {
            "codec numpy": lambda buf: codec.decode(buf, "numpy", bases=bases),
            "codec torch": lambda buf: codec.decode(buf, "torch", bases=bases).numpy(),
            "cloud batch": batched,
        }
        self.executions = 0
        self.decoded = 0
        self.rejected: Counter[str] = Counter()

    def __call__(self, buf: bytes) -> bool:
        """True when every decoder decodes `buf`, False when every one rejects it with CodecError;
        AssertionError when they disagree or an output breaks the contract (other errors propagate)."""
        self.executions += 1
        outcomes: dict[str, Any] = {}
        for name, decode in self.decoders.items():
            try:
                outcomes[name] = decode(buf)
            except self.error as exc:
                outcomes[name] = exc
        failed = {name for name, out in outcomes.items() if isinstance(out, self.error)}
        if failed:
            assert failed == set(outcomes), f"{sorted(failed)} reject the frame, the others decode it: {outcomes}"
            self.rejected[message_kind(outcomes["codec numpy"])] += 1
            return False
        T, d = self.codec.HEADER.unpack_from(buf, 0)[-2:]
        ans = self.codec.parse_frame(buf).kind == "ans"
        want = outcomes["codec numpy"]
        for name, out in outcomes.items():
            assert isinstance(out, np.ndarray) and out.dtype == np.float32, f"{name} gave {type(out)} {out.dtype}"
            assert out.shape == (T, d), f"{name} gave shape {out.shape}, the header says {(T, d)}"
            assert np.isfinite(out).all(), f"{name} gave non-finite values"
            if ans:  # the basis product runs in each backend's BLAS: equal to float32 rounding, not bit for bit
                assert np.allclose(out, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max(initial=1.0))), \
                    f"{name} differs from codec numpy"
            else:
                assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), f"{name} differs from codec numpy"
        self.decoded += 1
        return True

    def summary(self, seconds: float) -> str:
        """A few lines: executions, rate, outcomes, the most frequent rejections."""
        rate = self.executions / seconds if seconds > 0 else 0.0
        lines = [f"fuzz_frames: {self.executions} executions in {seconds:.1f} s ({rate:.0f}/s): "
                 f"{self.decoded} decoded, {sum(self.rejected.values())} rejected with CodecError, 0 contract failures"]
        lines += [f"  {n:8d}  {message}" for message, n in self.rejected.most_common(12)]
        return "\n".join(lines)


class KVChecker(FrameChecker):
    """The K/V codec's contract on one payload at a time: it decodes to float32, finite, of the shape of the chunk it
    was made for (KV_SHAPE), or raises CodecError."""

    def __init__(self) -> None:
        from splitlm.errors import CodecError
        from splitlm.quantize import kv_codec

        self.error, self.kv_codec = CodecError, kv_codec
        self.executions = 0
        self.decoded = 0
        self.rejected: Counter[str] = Counter()

    def __call__(self, buf: bytes) -> bool:
        self.executions += 1
        try:
            out = self.kv_codec.decode(buf, *KV_SHAPE)
        except self.error as exc:
            self.rejected[message_kind(exc)] += 1
            return False
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == KV_SHAPE, f"{type(out)} {out.shape}"
        assert np.isfinite(out).all(), "non-finite values"
        self.decoded += 1
        return True


KV_SHAPE = (2, 12, 16)
"""(heads, positions, dim) of the K/V payloads fuzzed."""


def seed_payloads() -> list[bytes]:
    """Small valid K/V codec payloads: keys and values steps, with and without the raw first position, one far
    outlier position (raw too)."""
    from splitlm.quantize import kv_codec

    rng = np.random.default_rng(1)
    x = (rng.standard_normal(KV_SHAPE) * rng.uniform(0.1, 4, (KV_SHAPE[0], 1, KV_SHAPE[2]))).astype(np.float32)
    y = x.copy()
    y[:, 7] *= 1e4
    return [kv_codec.encode(x, kv_codec.relative_steps(x, 0.01, 1), 1), kv_codec.encode(x, kv_codec.relative_steps(x, 0.002)),
            kv_codec.encode(x, kv_codec.logit_steps(np.full(KV_SHAPE[::2], 4.0), 0.15), 1), kv_codec.encode(y, np.full(32, 0.05))]


def fuzz_basis():
    """The calibrated basis the fuzzed ans frames are coded in (layer 0, dim 48, correlated channels)."""
    from splitlm.quantize.ans import Basis

    rng = np.random.default_rng(2)
    h = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 48)) + 0.1 * rng.standard_normal((256, 48))
    h[:, 5] += 40.0  # a massive channel
    return Basis.fit(0, h)


def seed_frames() -> list[bytes]:
    """Small valid frames of every kind and row form: fp32, fp16; tabq with coded rows of several
    widths, groups, rotation and outliers, raw fp16 rows and raw fp32 rows; ans frames with coded and raw rows."""
    from splitlm.quantize import codec
    from splitlm.quantize.config import CodecConfig

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    x[:, 5] *= 60  # an outlier channel
    x[1] = 0.0  # an all-zero row
    x[2] *= 1e-6  # a row in fp16's subnormal range: raw fp32 at a tight budget
    configs = [CodecConfig("fp32"), CodecConfig("fp16"), CodecConfig("tabq", entropy="none", error_budget=0.03),
               CodecConfig("tabq", entropy="none", error_budget=1e-3, group_size=16, rotate_block=16),
               CodecConfig("tabq", entropy="none", error_budget=1e-4, bit_widths=(2, 3), rotate_block=0),
               CodecConfig("tabq", entropy="none", ts_rule="channels", ts_channels=(5, 7), error_budget=0.05, rotate_block=0)]
    frames = [codec.encode(x, cfg) for cfg in configs]
    frames.append(codec.encode(x[:1, :7], CodecConfig("tabq", entropy="none", ts_rule="none", error_budget=0.1)))
    basis = fuzz_basis()
    frames += [codec.encode(x, CodecConfig("tabq", error_budget=eps), basis=basis) for eps in (0.03, 1e-6)]
    return frames


def _take_flag(args: list[str], name: str) -> str | None:
    """Remove libFuzzer's `-name=value` from args; its value, or None."""
    found = [a for a in args if a.startswith(f"-{name}=")]
    for a in found:
        args.remove(a)
    return found[-1].split("=", 1)[1] if found else None


def main(argv: list[str]) -> None:
    """Run libFuzzer over `FrameChecker` with argv's flags; prints the summary at exit."""
    import atheris

    args = list(argv)
    kv = "--kv" in args
    if kv:
        args.remove("--kv")
    with atheris.instrument_imports(include=["splitlm"]):
        checker = KVChecker() if kv else FrameChecker()
    runs, limit = _take_flag(args, "runs"), _take_flag(args, "max_total_time")
    if runs is not None:
        args.append(f"-atheris_runs={runs}")
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus directory: start from the seeds
        corpus = Path(tempfile.mkdtemp(prefix="fuzz_frames_"))
        for i, frame in enumerate(seed_payloads() if kv else seed_frames()):
            (corpus / f"seed{i}").write_bytes(frame)
        args.append(str(corpus))
    start = time.perf_counter()
    deadline = start + float(limit) if limit else float("inf")

    def report() -> None:
        print(checker.summary(time.perf_counter() - start), flush=True)

    def one_input(data: bytes) -> None:
        checker(data)
        if time.perf_counter() >= deadline:
            report()
            os._exit(0)  # as libFuzzer would, without its exit() that skips atexit

    atexit.register(report)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

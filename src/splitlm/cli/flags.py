"""Flags shared by the commands, and the checks that turn them into a plan or a one-line error."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

from splitlm.errors import ConfigError

log = logging.getLogger("splitlm")


def dataclass_default(cls, name: str):
    """The default of field `name` of dataclass `cls`: the one source of a flag's default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


CLI_CODEC = "fp32"
"""The CLI's --codec default. Deliberately not CodecConfig's (fp16): a plan made from flags is exact on
the link unless a lossy codec is asked for; the partitioner and hand-written plans keep CodecConfig's."""
MAX_TOKENS = 64
"""Tokens generate makes unless --max-tokens says otherwise."""


def add_sampling(p: argparse.ArgumentParser) -> None:
    from splitlm.sampling import SamplingParams

    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"tokens to generate (default {MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=dataclass_default(SamplingParams, "temperature"), help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=dataclass_default(SamplingParams, "top_k"), help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=dataclass_default(SamplingParams, "top_p"), help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=dataclass_default(SamplingParams, "seed"), help="random seed for sampling")


def add_model_and_plan(p: argparse.ArgumentParser) -> None:
    from splitlm.model.registry import DEFAULT_MODEL

    p.add_argument("--model", default=None, help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--split", type=int, default=None, help="split layer ℓ in [0, L] (default: the plan's, else L/2)")
    p.add_argument("--plan", default=None, help="a plan JSON file (fixes the split and the plan flags)")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import (
        CODEC_KINDS,
        ENTROPY_CODERS,
        GROUP_SIZES,
        KV_BITS,
        LM_HEAD_BITS,
        LM_HEAD_GROUP,
        TS_RULES,
        WEIGHT_BITS,
        WEIGHT_METHODS,
        CodecConfig,
        WeightQuant,
    )

    g = p.add_argument_group("plan (when no --plan is given)")
    for side in ("device", "cloud"):
        g.add_argument(f"--{side}-bits", type=int, default=dataclass_default(WeightQuant, "bits"), choices=WEIGHT_BITS,
                       help=f"{side} weight bits (16 = none)")
        g.add_argument(f"--{side}-group", type=int, default=dataclass_default(WeightQuant, "group_size"), choices=GROUP_SIZES,
                       help=f"{side} group size (-1 = per channel)")
        g.add_argument(f"--{side}-method", default="auto", choices=["auto", *sorted(WEIGHT_METHODS)],
                       help=f"{side} quantization method" + (
                           " (auto: the source file's own blocks where it holds every layer at --device-bits and no "
                           "--device-group is given, else rtn)" if side == "device" else
                           " (auto: rtn, whose codes the GPU kernels run)"))
        g.add_argument(f"--{side}-symmetric", action="store_true", help=f"symmetric {side} quantization")
    g.add_argument("--kv-bits", type=int, default=dataclass_default(Plan, "kv_bits"), choices=KV_BITS, help="device KV cache bits")
    g.add_argument("--codec", default=CLI_CODEC, choices=CODEC_KINDS, help=f"activation codec on the link (default {CLI_CODEC}: exact)")
    g.add_argument("--codec-eps", type=float, default=dataclass_default(CodecConfig, "error_budget"), help="TAB-Q error budget ε")
    g.add_argument("--ts-rule", default=dataclass_default(CodecConfig, "ts_rule"), choices=TS_RULES, help="threshold-splitting rule")
    g.add_argument("--ts-k", type=float, default=dataclass_default(CodecConfig, "ts_threshold"), help="outlier threshold in row standard deviations")
    g.add_argument("--codec-group", type=int, default=dataclass_default(CodecConfig, "group_size"), help="channels per codec scale (0 = per row)")
    g.add_argument("--codec-entropy", default=None, choices=ENTROPY_CODERS,
                   help="how tabq rows travel: ans (the default: transform coding in the split layer's calibrated basis "
                        "with ANS) or none (fixed-width TS + TAB-Q codes)")
    g.add_argument("--codec-deadzone", type=float, default=dataclass_default(CodecConfig, "deadzone"),
                   help="--codec-entropy ans: rounding dead zone toward zero, in [0, 0.5)")
    g.add_argument("--prefill-chunk", type=int, default=dataclass_default(Plan, "prefill_chunk"), help="positions per prefill step")
    g.add_argument("--lm-head-bits", type=int, default=None, choices=LM_HEAD_BITS,
                   help=f"LM head precision (the source's blocks where they are at that width, else RTN in groups of "
                        f"{LM_HEAD_GROUP}; default: 8 for a quantized device-only head, else "
                        f"{dataclass_default(Plan, 'lm_head_bits')})")
    g.add_argument("--calib-windows", type=int, default=16, help="calibration windows for calibrated methods")


def given_plan_flags(args) -> set[str]:
    """The plan flags given with a value other than their default, as "--flag" names."""
    probe = argparse.ArgumentParser()
    add_plan_flags(probe)
    return {f"--{dest.replace('_', '-')}" for dest, default in vars(probe.parse_args([])).items()
            if getattr(args, dest) != default}


def plan_and_check_flags(args, ckpt):
    """The plan of eval/export (--plan, or the plan flags) and whether it needs calibration data,
    after refusing the flags it would ignore."""
    from splitlm.quantize.config import WEIGHT_METHODS

    split, plan = split_and_plan(args, ckpt)
    given = given_plan_flags(args)
    L = ckpt.spec.num_layers
    if plan is not None:
        fixed = sorted(given - {"--calib-windows"})
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} would be ignored: --plan {args.plan} fixes the plan; drop them "
                              "or drop --plan")
    else:
        if not 0 <= split <= L:
            raise ConfigError(f"split layer {split} is outside [0, {L}] for {ckpt.model_id}")
        ignored = []  # (flags, why)
        for side in ("device", "cloud"):
            sub = {f"--{side}-group", f"--{side}-method", f"--{side}-symmetric"} & given
            if getattr(args, f"{side}_bits") == 16:
                ignored.append((sub, f"--{side}-bits 16 is unquantized"))
        if args.codec != "tabq":
            ignored.append(({"--codec-eps", "--ts-rule", "--ts-k", "--codec-group", "--codec-entropy", "--codec-deadzone"} & given,
                            f"they tune the tabq codec, not --codec {args.codec}"))
        if args.ts_rule != "std":
            ignored.append(({"--ts-k"} & given, f"it is the threshold of --ts-rule std, not {args.ts_rule}"))
        if split == 0:
            ignored.append(({f for f in given if f.startswith("--device-")} | ({"--kv-bits"} & given),
                            "split 0 leaves no layers on the device"))
        if split == L:
            ignored.append(({f for f in given if f.startswith(("--cloud-", "--codec", "--ts-"))},
                            f"split {L} leaves no layers on the cloud and nothing on the link"))
        for flags, why in ignored:
            if flags:
                raise ConfigError(f"{', '.join(sorted(flags))} would be ignored: {why}")
        plan = plan_from_flags(args, ckpt, split)
    calibrated = any(WEIGHT_METHODS[w.method].needs_calibration and w.bits != 16
                     for w in (plan.device_weights, plan.cloud_weights))
    if "--calib-windows" in given and not calibrated:
        methods = sorted(m for m, v in WEIGHT_METHODS.items() if v.needs_calibration)
        raise ConfigError(f"--calib-windows would be ignored: it feeds calibrated quantization methods "
                          f"({', '.join(methods)}) and this plan uses none")
    at_least(args.calib_windows, 1, "--calib-windows")
    return plan, calibrated


def plan_from_flags(args, ckpt, split: int):
    from splitlm.partition.plan import Plan
    from splitlm.quantize.apply import preferred_method
    from splitlm.quantize.config import SOURCE_GROUP, CodecConfig, WeightQuant

    given = given_plan_flags(args)
    wq = {}
    for side in ("device", "cloud"):
        bits, group, method = (getattr(args, f"{side}_{k}") for k in ("bits", "group", "method"))
        if method == "auto":
            free = side == "device" and not ({f"--{side}-group", f"--{side}-symmetric"} & given)
            method = preferred_method(ckpt, bits) if free else "rtn"
        if method == "source":
            if f"--{side}-group" in given and group != SOURCE_GROUP:
                raise ConfigError(f"--{side}-method source carries blocks of {SOURCE_GROUP}: --{side}-group {group} cannot apply")
            group = SOURCE_GROUP
        wq[side] = WeightQuant(bits, group, method, getattr(args, f"{side}_symmetric"))
    codec = CodecConfig(args.codec, ts_rule=args.ts_rule, ts_threshold=args.ts_k, error_budget=args.codec_eps,
                        group_size=args.codec_group, entropy=args.codec_entropy, deadzone=args.codec_deadzone)
    lm_head_bits = args.lm_head_bits
    if lm_head_bits is None:  # a device holding the LM head in fp32 would read more for it than for all its layers
        lm_head_bits = 8 if split == ckpt.spec.num_layers and wq["device"].bits != 16 else Plan.lm_head_bits
    return Plan(ckpt.model_id, ckpt.weights_hash, split, device_weights=wq["device"], cloud_weights=wq["cloud"],
                kv_bits=args.kv_bits, lm_head_bits=lm_head_bits, codec=codec, prefill_chunk=args.prefill_chunk,
                max_seq_len=ckpt.spec.max_position)


def load_model(model: str | None):
    from splitlm.model.registry import DEFAULT_MODEL, resolve_model

    t0 = time.perf_counter()
    ckpt = resolve_model(model or DEFAULT_MODEL)
    log.info("loaded %s in %.2fs", ckpt.model_id, time.perf_counter() - t0)
    return ckpt


def split_and_plan(args, ckpt):
    from splitlm.partition.plan import Plan

    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None:
        plan.check_model(ckpt.spec.num_layers, ckpt.weights_hash)
        if args.split is not None and args.split != plan.split_layer:
            raise ConfigError(f"--split {args.split} differs from the split {plan.split_layer} of --plan {args.plan}, "
                              "which fixes it; drop --split")
    split = args.split if args.split is not None else (plan.split_layer if plan else ckpt.spec.num_layers // 2)
    return split, plan


def check_output(path: str | None, flag: str) -> None:
    """Refuse, before any work is done, an output file that could not be written."""
    if path is None:
        return
    file = Path(path)
    parent = file.parent
    if file.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ConfigError(f"{flag} {path}: no permission to write it")


def at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}")


def check_sampling_flags(args) -> None:
    at_least(args.max_tokens, 1, "--max-tokens")
    if args.temperature == 0:
        unused = [flag for flag, used in (("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0),
                                          ("--seed", args.seed is not None)) if used]
        if unused:
            raise ConfigError(f"{', '.join(unused)} would be ignored: --temperature 0 (the default) is greedy; "
                              "give --temperature > 0 to sample")


def check_generate_flags(args) -> None:
    """Refuse generate flags that the chosen path would ignore."""
    check_sampling_flags(args)
    at_least(args.threads, 1, "--threads")
    check_output(args.json, "--json")
    if not args.artifacts:
        for flag, value in (("--server", args.server), ("--verify", args.verify), ("--speculate", args.speculate)):
            if value:
                raise ConfigError(f"{flag} needs --artifacts (an export): without it the model runs in-process in torch")
    for flag, value in (("--token", args.token), ("--tls-ca", args.tls_ca), ("--step-timeout", args.step_timeout),
                        ("--failover-deadline", args.failover_deadline)):
        if value and not args.server:
            raise ConfigError(f"{flag} needs --server: without it there is no connection to use it on")


def check_against_export(args, plan) -> None:
    """Refuse generate flags that an export fixes (model, plan, split) when they differ from it."""
    if args.model is not None and args.model != plan.model_id:
        raise ConfigError(f"--model {args.model}: the export in {args.artifacts} is of {plan.model_id}, which fixes the "
                          "model; drop --model")
    if args.split is not None and args.split != plan.split_layer:
        raise ConfigError(f"--split {args.split}: the export in {args.artifacts} splits at layer {plan.split_layer}, "
                          "which fixes the split; drop --split or export again")
    if args.plan is not None:
        from splitlm.partition.plan import Plan

        given = Plan.load(args.plan)
        if given.hash != plan.hash:
            raise ConfigError(f"--plan {args.plan} (plan {given.hash}) is not the plan of the export in {args.artifacts} "
                              f"({plan.hash}), which fixes it; drop --plan or export that plan")


UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "ms": 1.0, "s": 1e3}


def quantity(text: str, units: tuple[str, ...], what: str) -> float:
    """'64MB' -> bytes, '40ms' -> milliseconds."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = (m.group(2).lower() if m else "") or units[0]
    if not m or unit not in units:
        raise ConfigError(f"{what} {text!r} is not a number with one of the units {units}")
    return float(m.group(1)) * UNITS[unit]


def save_or_keep(save, path: str, what: str) -> None:
    """save(path); when that fails, save into a temporary file instead and say where (lose nothing)."""
    import tempfile

    try:
        save(path)
    except OSError as exc:
        fd, kept = tempfile.mkstemp(prefix=f"splitlm-{what}-", suffix=".json")
        os.close(fd)
        save(kept)
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}); the {what} is saved in {kept}") from None


def read_bytes(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None




def idle_cores(sample_s: float = 0.2) -> int:
    """Cores of this process's affinity set that were at least half idle over `sample_s` seconds (at least 1):
    how many compute threads can run now without fighting another process for a core (torch's OpenMP
    threads spin at barriers, and one of them sharing a core with a busy process slows every step ~3x)."""
    import time

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                    values = [int(v) for v in fields]
                    out[int(name[3:])] = (values[3] + values[4], sum(values))  # idle + iowait, total
        return out

    try:
        before = sample()
        time.sleep(sample_s)
        after = sample()
    except (OSError, ValueError, IndexError):
        return len(allowed) or 1
    idle = 0
    for cpu, (idle1, total1) in after.items():
        idle0, total0 = before.get(cpu, (idle1, total1))
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= 0.5:
            idle += 1
    return max(1, idle)

"""The `splitlm` command: thin drivers over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from splitlm.errors import ConfigError, SplitLMError

log = logging.getLogger("splitlm")


def _default(cls, name: str):
    """The default of field `name` of dataclass `cls`: the one source of a flag's default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


CLI_CODEC = "fp32"
"""The CLI's --codec default. Deliberately not CodecConfig's (fp16): a plan made from flags is exact on
the link unless a lossy codec is asked for; the partitioner and hand-written plans keep CodecConfig's."""
MAX_TOKENS = 64
"""Tokens generate makes unless --max-tokens says otherwise."""


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from splitlm.sampling import SamplingParams

    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"tokens to generate (default {MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=_default(SamplingParams, "temperature"), help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=_default(SamplingParams, "top_k"), help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=_default(SamplingParams, "top_p"), help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=_default(SamplingParams, "seed"), help="random seed for sampling")


def _add_model_and_plan(p: argparse.ArgumentParser) -> None:
    from splitlm.model.registry import DEFAULT_MODEL

    p.add_argument("--model", default=None, help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--split", type=int, default=None, help="split layer ℓ in [0, L] (default: the plan's, else L/2)")
    p.add_argument("--plan", default=None, help="a plan JSON file (fixes the split and the plan flags)")


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import (
        CODEC_KINDS,
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
        g.add_argument(f"--{side}-bits", type=int, default=_default(WeightQuant, "bits"), choices=WEIGHT_BITS,
                       help=f"{side} weight bits (16 = none)")
        g.add_argument(f"--{side}-group", type=int, default=_default(WeightQuant, "group_size"), choices=GROUP_SIZES,
                       help=f"{side} group size (-1 = per channel)")
        g.add_argument(f"--{side}-method", default=_default(WeightQuant, "method"), choices=sorted(WEIGHT_METHODS),
                       help=f"{side} quantization method")
        g.add_argument(f"--{side}-symmetric", action="store_true", help=f"symmetric {side} quantization")
    g.add_argument("--kv-bits", type=int, default=_default(Plan, "kv_bits"), choices=KV_BITS, help="device KV cache bits")
    g.add_argument("--codec", default=CLI_CODEC, choices=CODEC_KINDS, help=f"activation codec on the link (default {CLI_CODEC}: exact)")
    g.add_argument("--codec-eps", type=float, default=_default(CodecConfig, "error_budget"), help="TAB-Q error budget ε")
    g.add_argument("--ts-rule", default=_default(CodecConfig, "ts_rule"), choices=TS_RULES, help="threshold-splitting rule")
    g.add_argument("--ts-k", type=float, default=_default(CodecConfig, "ts_threshold"), help="outlier threshold in row standard deviations")
    g.add_argument("--codec-group", type=int, default=_default(CodecConfig, "group_size"), help="channels per codec scale (0 = per row)")
    g.add_argument("--prefill-chunk", type=int, default=_default(Plan, "prefill_chunk"), help="positions per prefill step")
    g.add_argument("--lm-head-bits", type=int, default=_default(Plan, "lm_head_bits"), choices=LM_HEAD_BITS,
                   help=f"LM head precision (RTN, groups of {LM_HEAD_GROUP})")
    g.add_argument("--calib-windows", type=int, default=16, help="calibration windows for calibrated methods")


def _given_plan_flags(args) -> set[str]:
    """The plan flags given with a value other than their default, as "--flag" names."""
    probe = argparse.ArgumentParser()
    _add_plan_flags(probe)
    return {f"--{dest.replace('_', '-')}" for dest, default in vars(probe.parse_args([])).items()
            if getattr(args, dest) != default}


def _plan_and_check_flags(args, ckpt):
    """The plan of eval/export (--plan, or the plan flags) and whether it needs calibration data,
    after refusing the flags it would ignore."""
    from splitlm.quantize.config import WEIGHT_METHODS

    split, plan = _split_and_plan(args, ckpt)
    given = _given_plan_flags(args)
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
            ignored.append(({"--codec-eps", "--ts-rule", "--ts-k", "--codec-group"} & given,
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
        plan = _plan_from_flags(args, ckpt, split)
    calibrated = any(WEIGHT_METHODS[w.method].needs_calibration and w.bits != 16
                     for w in (plan.device_weights, plan.cloud_weights))
    if "--calib-windows" in given and not calibrated:
        methods = sorted(m for m, v in WEIGHT_METHODS.items() if v.needs_calibration)
        raise ConfigError(f"--calib-windows would be ignored: it feeds calibrated quantization methods "
                          f"({', '.join(methods)}) and this plan uses none")
    _at_least(args.calib_windows, 1, "--calib-windows")
    return plan, calibrated


def _plan_from_flags(args, ckpt, split: int):
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig, WeightQuant

    wq = {side: WeightQuant(getattr(args, f"{side}_bits"), getattr(args, f"{side}_group"),
                            getattr(args, f"{side}_method"), getattr(args, f"{side}_symmetric"))
          for side in ("device", "cloud")}
    codec = CodecConfig(args.codec, ts_rule=args.ts_rule, ts_threshold=args.ts_k, error_budget=args.codec_eps,
                        group_size=args.codec_group)
    return Plan(ckpt.model_id, ckpt.weights_hash, split, device_weights=wq["device"], cloud_weights=wq["cloud"],
                kv_bits=args.kv_bits, lm_head_bits=args.lm_head_bits, codec=codec, prefill_chunk=args.prefill_chunk,
                max_seq_len=ckpt.spec.max_position)


def _add_serve_parser(sub) -> None:
    v = sub.add_parser("serve", help="serve the cloud tail of an export over gRPC")
    v.add_argument("--artifacts", required=True, help="an export directory (its cloud/ folder is served)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    v.add_argument("--token", default=None, help="require this bearer token")
    v.add_argument("--max-sessions", type=int, default=64)
    v.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS (with --tls-key)")
    v.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    v.add_argument("--verify", action="store_true", help="check the sha256 of every exported file (sizes are always checked)")
    v.add_argument("--port-file", default=None, metavar="PATH",
                   help="once listening, write the bound port to PATH (atomically): how a script learns the port of --port 0")


def _add_profile_parser(sub) -> None:
    from splitlm.model.registry import DEFAULT_MODEL

    pr = sub.add_parser("profile", help="measure device, cloud, codec and quality costs of a model on this machine")
    pr.add_argument("--model", default=None, help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    pr.add_argument("--out", required=True, help="where to write the profile JSON")
    pr.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    pr.add_argument("--bandwidth", default=None, help="link bandwidth in Mbit/s (default 50)")
    pr.add_argument("--rtt", default=None, help="link round-trip time (default 20ms)")
    pr.add_argument("--reps", type=int, default=None, help="timing repetitions (median; default 7)")
    pr.add_argument("--server", default=None, help="HOST:PORT of a running `splitlm serve`: probe the link's RTT against it")
    pr.add_argument("--link-only", default=None, metavar="PROFILE",
                    help="measure nothing but the link (--server, or --bandwidth/--rtt given) and write PROFILE with it "
                         "to --out: re-profile a new network without re-measuring the model")


def _add_generate(sub) -> None:
    """The generate command's flags."""
    g = sub.add_parser("generate", help="generate text with the model split at a layer")
    _add_model_and_plan(g)
    g.add_argument("--artifacts", default=None, help="an export directory: run its ONNX head (and its tail in-process)")
    g.add_argument("--threads", type=int, default=None, help="onnxruntime threads on the device (with --artifacts; default: all cores)")
    g.add_argument("--verify", action="store_true", help="check the sha256 of every exported file (sizes are always checked)")
    g.add_argument("--server", default=None, help="HOST:PORT of `splitlm serve` (with --artifacts; else the tail runs in-process)")
    g.add_argument("--token", default=None, help="bearer token for the server")
    g.add_argument("--tls-ca", default=None, help="PEM root certificate(s): connect to the server over TLS")
    g.add_argument("--step-timeout", type=float, default=None,
                   help="with --server: seconds to wait for each token (default 15; prefill frames get 0.02 s more per row)")
    g.add_argument("--json", default=None, help="also write timings and bytes as JSON here")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling(g)


def _add_eval(sub) -> None:
    """The eval command's flags."""
    e = sub.add_parser("eval", help="perplexity (and bytes per token) of a plan on pydoc_data.topics in 512-token windows, or on a text file")
    _add_model_and_plan(e)
    _add_plan_flags(e)
    e.add_argument("--windows", type=int, default=8, help="number of 512-token windows (default 8)")
    e.add_argument("--window-size", type=int, default=512)
    e.add_argument("--text", default=None, help="a UTF-8 text file instead of pydoc_data.topics")
    e.add_argument("--json", default=None, help="also write the result as JSON here")


def _add_export(sub) -> None:
    """The export command's flags."""
    from splitlm.quantize.config import ACCURACY_LEVEL, ACCURACY_LEVELS

    x = sub.add_parser("export", help="export the device head (ONNX) and the cloud tail for a plan")
    _add_model_and_plan(x)
    x.add_argument("--out", required=True, help="output directory (gets device/ and cloud/)")
    x.add_argument("--check", action="store_true", help="compare the ONNX head with the torch head; fail beyond tolerance")
    x.add_argument("--accuracy-level", type=int, default=ACCURACY_LEVEL, choices=ACCURACY_LEVELS,
                   help=f"MatMulNBits accuracy_level (default {ACCURACY_LEVEL}): 4 = int8 compute, fast on CPU; 0 = fp32 compute, exact")
    _add_plan_flags(x)


def _add_partition(sub) -> None:
    """The partition command's flags."""
    from splitlm.partition.search import OBJECTIVES, Budgets

    pt = sub.add_parser("partition", help="choose a plan from a profile under memory and latency budgets")
    pt.add_argument("--profile", required=True, help="a profile JSON (from `splitlm profile`, or written by hand)")
    pt.add_argument("--device-memory", required=True, help="device memory budget, e.g. 64MB or 1.5GiB")
    pt.add_argument("--token-latency", required=True, help="per-token latency budget, e.g. 40ms")
    pt.add_argument("--ttft", default=None, help="time-to-first-token budget, e.g. 500ms")
    pt.add_argument("--max-seq-len", type=int, default=_default(Budgets, "max_seq_len"), help="sequence length to plan for (default: longest that fits)")
    pt.add_argument("--prompt-tokens", type=int, default=_default(Budgets, "prompt_tokens"),
                    help="prompt length the TTFT is predicted for")
    pt.add_argument("--objective", choices=OBJECTIVES, default=_default(Budgets, "objective"))
    tolerance = _default(Budgets, "quality_tolerance")
    pt.add_argument("--quality-tolerance", type=float, default=tolerance,
                    help="quality objective: perplexities within this fraction of the best count as equal and the "
                         f"fastest of them wins (default {tolerance})")
    pt.add_argument("--out", required=True, help="where to write the chosen plan")
    pt.add_argument("--top", type=int, default=10, help="Pareto candidates to print")
    pt.add_argument("--plot", default=None, help="write a Pareto plot (PNG/SVG/PDF) of the feasible plans here")


def _add_demo(sub) -> None:
    """The demo command's flags."""
    from splitlm.model.registry import DEFAULT_MODEL

    d = sub.add_parser("demo", help="split generation end to end: export (cached), serve on loopback, stream, report")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--prompt", default="The three most useful things to know about Python are")
    d.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")


def _parser() -> argparse.ArgumentParser:

    ap = argparse.ArgumentParser(prog="splitlm", description="Run an LLM split between an edge device and a cloud server.")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="splitlm's own debug logging; -vv also the libraries' (onnx exporter, grpc, ...)")
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the models splitlm can load")

    _add_generate(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_serve_parser(sub)
    _add_profile_parser(sub)
    _add_partition(sub)
    _add_demo(sub)
    return ap


def _load(model: str | None):
    from splitlm.model.registry import DEFAULT_MODEL, resolve_model

    t0 = time.perf_counter()
    ckpt = resolve_model(model or DEFAULT_MODEL)
    log.info("loaded %s in %.2fs", ckpt.model_id, time.perf_counter() - t0)
    return ckpt


def _split_and_plan(args, ckpt):
    from splitlm.partition.plan import Plan

    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None:
        plan.check_model(ckpt.spec.num_layers, ckpt.weights_hash)
        if args.split is not None and args.split != plan.split_layer:
            raise ConfigError(f"--split {args.split} differs from the split {plan.split_layer} of --plan {args.plan}, "
                              "which fixes it; drop --split")
    split = args.split if args.split is not None else (plan.split_layer if plan else ckpt.spec.num_layers // 2)
    return split, plan


def _chat_prompt(prompt: str, tok, template: str | None, spec) -> str:
    """`prompt` as a user turn in the model's chat template (ChatML when it carries none)."""
    from splitlm.model.chat import chat_prompt

    eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
    return chat_prompt(prompt, tok, template, spec.bos_token_id, eos)


def _check_output(path: str | None, flag: str) -> None:
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


def _at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}")


def _check_sampling_flags(args) -> None:
    _at_least(args.max_tokens, 1, "--max-tokens")
    if args.temperature == 0:
        unused = [flag for flag, used in (("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0),
                                          ("--seed", args.seed is not None)) if used]
        if unused:
            raise ConfigError(f"{', '.join(unused)} would be ignored: --temperature 0 (the default) is greedy; "
                              "give --temperature > 0 to sample")


def _check_generate_flags(args) -> None:
    """Refuse generate flags that the chosen path would ignore."""
    _check_sampling_flags(args)
    _at_least(args.threads, 1, "--threads")
    _check_output(args.json, "--json")
    if not args.artifacts:
        for flag, value in (("--server", args.server), ("--threads", args.threads), ("--verify", args.verify)):
            if value:
                raise ConfigError(f"{flag} needs --artifacts (an export): without it the model runs in-process in torch")
    for flag, value in (("--token", args.token), ("--tls-ca", args.tls_ca), ("--step-timeout", args.step_timeout)):
        if value and not args.server:
            raise ConfigError(f"{flag} needs --server: without it there is no connection to use it on")


def _check_against_export(args, plan) -> None:
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


def cmd_models(args) -> int:
    from splitlm.model.registry import list_models

    rows = list_models()
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.status:<10}  {r.description}")
    return 0


def cmd_generate(args) -> int:
    from splitlm.model.tokenizer import StreamingDecoder
    from splitlm.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    _check_generate_flags(args)
    if args.artifacts:
        result, tok, split, L, plan, chat = _generate_from_artifacts(args, sampling)
    else:
        from splitlm.local import LocalSplit

        ckpt = _load(args.model)
        split, plan = _split_and_plan(args, ckpt)
        runner = LocalSplit(ckpt, split, plan=plan)
        tok, L, chat = ckpt.tokenizer(), ckpt.spec.num_layers, (ckpt.chat_template(), ckpt.spec)
    prompt = _chat_prompt(args.prompt, tok, *chat) if args.chat else args.prompt
    ids = tok.encode(prompt).ids
    stream = StreamingDecoder(tok)
    print(args.prompt if not args.chat else "", end="", flush=True)
    show = lambda t: print(stream.push(t), end="", flush=True)  # noqa: E731
    result = result(ids, show) if args.artifacts else runner.generate(ids, args.max_tokens, sampling, on_token=show)
    print()
    link = f", {result.link_bytes / max(1, len(ids) + len(result.token_ids) - 1):.0f} B/token on the link" if result.link_bytes else ""
    if "bytes_up" in result.extra:
        link += f" (wire: {result.extra['bytes_up']} B up, {result.extra['bytes_down']} B down)"
    print(f"[split {split}/{L}] {len(ids)} prompt tokens, {len(result.token_ids)} generated "
          f"({result.stop_reason}); TTFT {result.ttft_s * 1e3:.0f} ms, {result.tokens_per_s:.1f} tokens/s{link}",
          file=sys.stderr)
    if plan is not None and plan.predictions.token_latency_ms is not None:
        print(_predicted_vs_measured(plan, result), file=sys.stderr)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"split": split, "layers": L, "prompt_tokens": len(ids), "tokens": result.token_ids,
                       "text": result.text, "ttft_s": result.ttft_s, "decode_s": result.decode_s,
                       "tokens_per_s": result.tokens_per_s, "link_bytes": result.link_bytes,
                       "stop_reason": result.stop_reason, **result.extra}, f, indent=2)
    return 0


def _predicted_vs_measured(plan, result) -> str:
    """One line: the partitioner's predictions for this plan against what this run measured."""
    p = plan.predictions
    measured_ms = 1e3 / result.tokens_per_s if result.tokens_per_s > 0 else float("nan")
    line = (f"[plan] predicted {p.token_latency_ms:.1f} ms/token (at {plan.max_seq_len} positions), measured {measured_ms:.1f}"
            f" (at <= {len(result.prompt_ids) + len(result.token_ids)})")
    if p.ttft_ms is not None:
        line += (f"; predicted TTFT {p.ttft_ms:.0f} ms for {p.prompt_tokens or '?'} prompt tokens, measured "
                 f"{result.ttft_s * 1e3:.0f} ms for {len(result.prompt_ids)}")
    return line


def _generate_from_artifacts(args, sampling):
    """ONNX head on the device side; for split plans, the tail on --server or else the exported tail in this
    process. Returns (run, tokenizer, split, L, plan, (chat template, spec))."""
    from splitlm.artifacts import export_side
    from splitlm.device.runtime import HeadSession, generate_device_only, generate_split, load_tokenizer
    from splitlm.model.chat import load_template

    root = args.artifacts
    session = HeadSession(export_side(root, "device"), threads=args.threads, verify=args.verify)
    _check_against_export(args, session.plan)
    tok = load_tokenizer(session.dir)
    L = session.spec.num_layers
    if session.device_only and args.server:
        raise ConfigError(f"--server: the export in {root} is device-only (split {L}/{L}), there is no cloud part to "
                          "run on a server; drop --server")
    if session.device_only:
        run = lambda ids, show: generate_device_only(session, ids, args.max_tokens, sampling, show, tok)  # noqa: E731
    else:
        if args.server:
            from splitlm.device.client import LinkConfig, RemoteSession, connect

            link = LinkConfig() if args.step_timeout is None else LinkConfig(step_timeout_s=args.step_timeout)
            channel = connect(args.server, args.tls_ca, link)  # a bad address or certificate file fails here

            def run(ids, show):
                with RemoteSession(channel, session.plan.hash, session.plan.model_id,
                                   sampling, args.max_tokens, args.token) as remote:
                    result = generate_split(session, remote.next_token, ids, args.max_tokens, show, tok)
                result.extra.update(bytes_up=remote.bytes_up, bytes_down=remote.bytes_down)
                return result
        else:
            from splitlm.cloud.tail import TailRunner

            tail = TailRunner(export_side(root, "cloud"), verify=args.verify)
            if tail.plan.hash != session.plan.hash:
                raise ConfigError(f"device plan {session.plan.hash} and cloud plan {tail.plan.hash} differ")
            tail_session = tail.new_session(sampling)
            run = lambda ids, show: generate_split(session, tail_session.next_token, ids, args.max_tokens, show, tok)  # noqa: E731
    return run, tok, session.plan.split_layer, L, session.plan, (load_template(session.dir), session.spec)


def cmd_eval(args) -> int:
    import json

    from splitlm import evaluate

    _check_output(args.json, "--json")
    _at_least(args.windows, 1, "--windows")
    _at_least(args.window_size, 2, "--window-size")
    ckpt = _load(args.model)
    plan, calibrated = _plan_and_check_flags(args, ckpt)
    tok = ckpt.tokenizer()
    text = evaluate.read_text(args.text) if args.text else evaluate.protocol_text()
    wins = evaluate.windows(tok, text, args.windows, args.window_size)
    calib = None
    if calibrated:
        if not args.text and args.windows > evaluate.eval_windows_limit(tok, args.calib_windows, args.window_size):
            raise ConfigError(f"{args.windows} evaluation windows would overlap the last {args.calib_windows} calibration windows")
        calib = evaluate.calibration_windows(tok, args.calib_windows, args.window_size)
    t0 = time.perf_counter()
    res = evaluate.evaluate_plan(ckpt, plan, wins, calib)
    source = args.text or "pydoc_data.topics"
    link = (f"  link {res.bytes_per_token:.1f} B/token ({res.fp16_bytes_per_token / res.bytes_per_token:.2f}x smaller than fp16)"
            if res.bytes_per_token else "  link none (device-only)")
    print(f"model {ckpt.model_id}  split {plan.split_layer}  text {source}  windows {res.windows}x{args.window_size}  "
          f"tokens {res.tokens}  perplexity {res.perplexity:.4f}{link}  ({time.perf_counter() - t0:.1f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": ckpt.model_id, "split": plan.split_layer, "text": source, "windows": res.windows,
                       "window_size": args.window_size, "tokens": res.tokens, "nll": res.nll,
                       "perplexity": res.perplexity, "bytes_per_token": res.bytes_per_token,
                       "plan": plan.to_dict()}, f, indent=2)
    return 0


def cmd_export(args) -> int:
    from splitlm import evaluate
    from splitlm.export import check_parity, export_artifacts
    from splitlm.quantize.config import ACCURACY_LEVEL

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory (it gets device/ and cloud/)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {args.out}: no permission to write in {existing}")
    ckpt = _load(args.model)
    plan, calibrated = _plan_and_check_flags(args, ckpt)
    L = ckpt.spec.num_layers
    if args.accuracy_level != ACCURACY_LEVEL and not ((0 < plan.split_layer and plan.device_weights.bits != 16)
                                         or (plan.split_layer == L and plan.lm_head_bits != 16)):
        raise ConfigError(f"--accuracy-level {args.accuracy_level} would be ignored: it sets the quantized matmuls of "
                          "the device head, and this plan's device head has none")
    calib = None
    if calibrated:
        calib = evaluate.calibration_windows(ckpt.tokenizer(), args.calib_windows)
    result = export_artifacts(ckpt, plan, args.out, calib, accuracy_level=args.accuracy_level)
    print(f"exported plan {plan.hash} (split {plan.split_layer}/{ckpt.spec.num_layers}) in {result.seconds:.1f}s")
    print(f"  device: {result.device_dir}  head.onnx {result.head_bytes / 2**20:.1f} MiB")
    if result.cloud_dir is not None:
        print(f"  cloud:  {result.cloud_dir}  tail.safetensors {result.tail_bytes / 2**20:.1f} MiB")
    if args.check:
        worst = check_parity(ckpt, plan, result.device_dir, calib)
        print("  parity: " + ", ".join(f"{k} {v:.1e}" for k, v in list(worst.items())[:3]) + " (worst relative error) ok")
    return 0


def _read_bytes(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _write_port_file(path: str, port: int) -> None:
    """`port` into `path`, atomically (a temporary file beside it, then a rename): a reader that sees
    the file sees the whole port."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{port}\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--port-file {path}: cannot write it ({exc.strerror or exc})") from None


def cmd_serve(args) -> int:
    from splitlm.artifacts import export_side
    from splitlm.cloud.service import ServerConfig, start_server, tls_credentials
    from splitlm.cloud.tail import TailRunner

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port: give 0..65535 (0 picks a free one)")
    _at_least(args.max_sessions, 1, "--max-sessions")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    _check_output(args.port_file, "--port-file")
    credentials = tls_credentials(_read_bytes(args.tls_cert), _read_bytes(args.tls_key)) if args.tls_cert else None
    runner = TailRunner(export_side(args.artifacts, "cloud"), verify=args.verify)
    server, port, _ = start_server(runner, f"{args.host}:{args.port}",
                                   ServerConfig(max_sessions=args.max_sessions, auth_token=args.token), credentials)
    try:
        if args.port_file:
            _write_port_file(args.port_file, port)
        print(f"serving plan {runner.plan.hash} (layers [{runner.plan.split_layer}, {runner.spec.num_layers})) on {args.host}:{port}",
              flush=True)
        server.wait_for_termination()
    finally:
        server.stop(grace=2)
    return 0


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "ms": 1.0, "s": 1e3}


def _quantity(text: str, units: tuple[str, ...], what: str) -> float:
    """'64MB' -> bytes, '40ms' -> milliseconds."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = (m.group(2).lower() if m else "") or units[0]
    if not m or unit not in units:
        raise ConfigError(f"{what} {text!r} is not a number with one of the units {units}")
    return float(m.group(1)) * _UNITS[unit]


def cmd_profile(args) -> int:
    import dataclasses

    from splitlm.partition.profile import LinkProfile, Profile
    from splitlm.profiler import ProfileConfig, measure_profile, probe_rtt_ms, write_partial

    def mbps(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise ConfigError(f"--bandwidth is a number of Mbit/s > 0, got {text!r}")
        return value

    _check_output(args.out, "--out")
    _at_least(args.threads, 1, "--threads")
    _at_least(args.reps, 1, "--reps")
    rtt = _quantity(args.rtt, ("ms", "s"), "--rtt") if args.rtt is not None else None
    if args.server is not None and rtt is not None:
        raise ConfigError("--rtt would be ignored: --server probes the RTT; give one of them")
    if args.link_only:
        if args.server is None and args.bandwidth is None and rtt is None:
            raise ConfigError("--link-only needs --server, --bandwidth or --rtt: there is nothing else to measure")
        unused = [f for f, v in (("--model", args.model), ("--threads", args.threads), ("--reps", args.reps)) if v is not None]
        if unused:
            raise ConfigError(f"{', '.join(unused)} would be ignored: --link-only measures nothing but the link")
        profile = Profile.load(args.link_only)
        if args.server:
            rtt = probe_rtt_ms(args.server)
        old = profile.link
        link = LinkProfile(mbps(args.bandwidth) if args.bandwidth else old.bandwidth_mbps, old.rtt_ms if rtt is None else rtt)
        dataclasses.replace(profile, link=link).save(args.out)
        print(f"link: {link.bandwidth_mbps:g} Mbit/s, RTT {link.rtt_ms:.2f} ms"
              + (f" (probed against {args.server})" if args.server else "") + f" -> {args.out}")
        return 0
    link = LinkProfile(mbps(args.bandwidth or "50"), 20.0 if rtt is None else rtt)
    if args.server:
        probe_rtt_ms(args.server, count=1)  # a server that is not there fails now, not after the measuring
    ckpt = _load(args.model)
    t0 = time.perf_counter()
    phases: dict[str, dict] = {}
    partial = args.out + ".partial"
    config = ProfileConfig(threads=args.threads, reps=7 if args.reps is None else args.reps, server=args.server)
    try:
        profile = measure_profile(ckpt, link, config, on_phase=phases.__setitem__)
    except BaseException as exc:
        if phases:
            try:
                write_partial(partial, ckpt, phases, exc)
                note = f"what they measured is in {partial}"
            except OSError as err:
                note = f"saving what they measured to {partial} failed too: {err}"
            print(f"splitlm profile: stopped after {len(phases)} phases ({type(exc).__name__}); {note}", file=sys.stderr)
        raise
    _save_or_keep(profile.save, args.out, "profile")
    Path(partial).unlink(missing_ok=True)
    print(f"profiled {ckpt.model_id} in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


def _save_or_keep(save, path: str, what: str) -> None:
    """save(path); when that fails, save into a temporary file instead and say where (lose nothing)."""
    import tempfile

    try:
        save(path)
    except OSError as exc:
        fd, kept = tempfile.mkstemp(prefix=f"splitlm-{what}-", suffix=".json")
        os.close(fd)
        save(kept)
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}); the {what} is saved in {kept}") from None


def cmd_partition(args) -> int:
    from splitlm.partition.profile import Profile
    from splitlm.partition.search import Budgets, describe, search, to_plan

    _check_output(args.out, "--out")
    _check_output(args.plot, "--plot")
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {args.plot}: give a .png, .svg or .pdf file")
    _at_least(args.max_seq_len, 1, "--max-seq-len")
    _at_least(args.prompt_tokens, 1, "--prompt-tokens")
    profile = Profile.load(args.profile)
    budgets = Budgets(
        device_memory_bytes=_quantity(args.device_memory, ("mb", "b", "kb", "gb", "kib", "mib", "gib"), "--device-memory"),
        token_latency_ms=_quantity(args.token_latency, ("ms", "s"), "--token-latency"),
        ttft_ms=_quantity(args.ttft, ("ms", "s"), "--ttft") if args.ttft else None,
        max_seq_len=args.max_seq_len, prompt_tokens=args.prompt_tokens, objective=args.objective,
        quality_tolerance=args.quality_tolerance)
    t0 = time.perf_counter()
    result = search(profile, budgets)
    seconds = time.perf_counter() - t0
    if result.chosen is None:
        print(result.message, file=sys.stderr)
        return 3
    L = profile.num_layers
    print(f"{'plan':<62}{'MiB':>8}{'ms/tok':>9}{'TTFT ms':>9}{'B/tok':>8}{'ppl':>9}")
    front = sorted(result.pareto, key=lambda c: (c.perplexity, c.token_latency_ms) if args.objective == "quality"
                   else (c.token_latency_ms, c.perplexity))
    for c in front[: args.top]:
        mark = "*" if c == result.chosen else " "
        print(f"{mark}{describe(c, L):<61}{c.memory_bytes / 2**20:>8.1f}{c.token_latency_ms:>9.1f}{c.ttft_ms:>9.0f}"
              f"{c.bytes_per_token:>8.0f}{c.perplexity:>9.3f}")
    print(result.message)
    print(f"searched {result.evaluated} configurations in {seconds:.2f} s")
    _save_or_keep(to_plan(result.chosen, profile, budgets).save, args.out, "plan")
    print(f"wrote {args.out}")
    if args.plot:
        from splitlm.partition.plot import pareto_plot

        pareto_plot(result, L, args.plot, f"{profile.model_id}: {budgets.device_memory_bytes / 2**20:.0f} MiB, "
                    f"{budgets.token_latency_ms:.0f} ms/token")
        print(f"wrote {args.plot}")
    return 0


def cmd_demo(args) -> int:
    from splitlm.demo import run_demo

    _at_least(args.max_tokens, 1, "--max-tokens")
    run_demo(args.model, args.prompt, args.max_tokens, lambda text: print(text, end="", flush=True))
    return 0


COMMANDS = {"models": cmd_models, "generate": cmd_generate, "eval": cmd_eval, "export": cmd_export, "serve": cmd_serve,
            "profile": cmd_profile, "partition": cmd_partition, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("splitlm").setLevel(logging.DEBUG)
    try:
        return COMMANDS[args.command](args)
    except SplitLMError as exc:
        print(f"splitlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

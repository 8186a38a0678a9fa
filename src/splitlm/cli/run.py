"""The commands that run the model here: models, generate, eval, export, demo."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from splitlm.cli.flags import (
    add_model_and_plan,
    add_plan_flags,
    add_sampling,
    at_least,
    check_against_export,
    check_generate_flags,
    check_output,
    idle_cores,
    load_model,
    plan_and_check_flags,
    split_and_plan,
)
from splitlm.errors import ConfigError


def add_generate(sub) -> None:
    """The generate command's flags."""
    g = sub.add_parser("generate", help="generate text with the model split at a layer")
    add_model_and_plan(g)
    g.add_argument("--artifacts", default=None, help="an export directory: run its ONNX head (and its tail in-process)")
    g.add_argument("--threads", type=int, default=None,
                   help="compute threads: the device head's (onnxruntime) and, in process, torch's (default: the cores idle "
                        "now; OMP_NUM_THREADS, when set, for torch)")
    g.add_argument("--verify", action="store_true", help="check the sha256 of every exported file (sizes are always checked)")
    g.add_argument("--server", default=None,
                   help="HOST:PORT of `splitlm serve`, or several separated by commas: replicas of the same export, "
                        "sessions spread by gRPC round_robin; a session whose server fails is rebuilt on one that "
                        "answers by replay (with --artifacts; else the tail runs in-process)")
    g.add_argument("--failover-deadline", type=float, default=None,
                   help="with --server: seconds a failed session may take to find a replica before the error (default 60)")
    g.add_argument("--token", default=None, help="bearer token for the server")
    g.add_argument("--tls-ca", default=None, help="PEM root certificate(s): connect to the server over TLS")
    g.add_argument("--step-timeout", type=float, default=None,
                   help="with --server: seconds to wait for each token (default 15; prefill frames get 0.02 s more per row)")
    g.add_argument("--speculate", action="store_true",
                   help="with --artifacts, a split export: draft tokens on the device from the session's own text (prompt "
                        "lookup) and have the cloud verify them in one step, several tokens per round trip with the same "
                        "output; --json reports tokens_per_round_trip")
    g.add_argument("--json", default=None, help="also write timings and bytes as JSON here")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling(g)


def add_eval(sub) -> None:
    """The eval command's flags."""
    e = sub.add_parser("eval", help="perplexity (and bytes per token) of a plan on pydoc_data.topics in 512-token windows, or on a text file")
    add_model_and_plan(e)
    add_plan_flags(e)
    e.add_argument("--windows", type=int, default=8, help="number of 512-token windows (default 8)")
    e.add_argument("--window-size", type=int, default=512, help="tokens per evaluation window (default 512)")
    e.add_argument("--text", default=None, help="a UTF-8 text file instead of pydoc_data.topics")
    e.add_argument("--json", default=None, help="also write the result as JSON here")


def add_export(sub) -> None:
    """The export command's flags."""
    from splitlm.quantize.config import ACCURACY_LEVEL, ACCURACY_LEVELS

    x = sub.add_parser("export", help="export the device head (ONNX) and the cloud tail for a plan")
    add_model_and_plan(x)
    x.add_argument("--out", required=True, help="output directory (gets device/ and cloud/)")
    x.add_argument("--check", action="store_true", help="compare the ONNX head with the torch head; fail beyond tolerance")
    x.add_argument("--accuracy-level", type=int, default=ACCURACY_LEVEL, choices=ACCURACY_LEVELS,
                   help=f"MatMulNBits accuracy_level (default {ACCURACY_LEVEL}): 4 = int8 compute, fast on CPU; 0 = fp32 compute, exact")
    x.add_argument("--segment-cuts", default="", metavar="LAYERS",
                   help="cut the device head into segments at these layers (comma-separated, inside (0, split)): each is a "
                        "graph with its own KV buffers, and the device can stop at any cut and release what lies beyond")
    add_plan_flags(x)


def add_demo(sub) -> None:
    """The demo command's flags."""
    from splitlm.model.registry import DEFAULT_MODEL

    d = sub.add_parser("demo", help="split generation end to end: export (cached), serve on loopback, stream, report")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"model to split (default {DEFAULT_MODEL})")
    d.add_argument("--prompt", default="The three most useful things to know about Python are", help="prompt text")
    d.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")


def _chat_prompt(prompt: str, tok, template: str | None, spec) -> str:
    """`prompt` as a user turn in the model's chat template (ChatML when it carries none)."""
    from splitlm.model.chat import chat_prompt

    eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
    return chat_prompt(prompt, tok, template, spec.bos_token_id, eos)


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
    check_generate_flags(args)
    notice = _choose_threads(args)
    if args.artifacts:
        result, tok, split, L, plan, chat = _generate_from_artifacts(args, sampling)
    else:
        from splitlm.local import LocalSplit

        ckpt = load_model(args.model)
        split, plan = split_and_plan(args, ckpt)
        runner = LocalSplit(ckpt, split, plan=plan)
        tok, L, chat = ckpt.tokenizer(), ckpt.spec.num_layers, (ckpt.chat_template(), ckpt.spec)
    if notice:  # after every check: an error stays one line
        print(notice, file=sys.stderr)
    prompt = _chat_prompt(args.prompt, tok, *chat) if args.chat else args.prompt
    ids = tok.encode(prompt).ids
    stream = StreamingDecoder(tok)
    print(args.prompt if not args.chat else "", end="", flush=True)
    show = lambda t: print(stream.push(t), end="", flush=True)  # noqa: E731
    result = result(ids, show) if args.artifacts else runner.generate(ids, args.max_tokens, sampling, on_token=show,
                                                                      on_prefill=_prefill_progress)
    print()
    link = f", {result.link_bytes / max(1, len(ids) + len(result.token_ids) - 1):.0f} B/token on the link" if result.link_bytes else ""
    if "bytes_up" in result.extra:
        link += f" (wire: {result.extra['bytes_up']} B up, {result.extra['bytes_down']} B down)"
    up = result.extra.get("uplink")
    if up and up["prefill_errors"] and plan is not None and max(up["prefill_errors"]) > plan.codec.error_budget:
        link += (f"; uplink {8e-6 * up['bytes_per_s']:.2f} Mbit/s: prompt frames at ε {min(up['prefill_errors']):.3g} to "
                 f"{max(up['prefill_errors']):.3g} (the plan's {plan.codec.error_budget:.3g}, at most {plan.prefill_max_error:.3g})")
    if result.extra.get("drafted") is not None:
        link += (f"; speculation: {result.extra['tokens_per_round_trip'] or 0:.2f} tokens per round trip, "
                 f"{result.extra['accepted']} of {result.extra['drafted']} drafts kept")
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


def _choose_threads(args) -> str | None:
    """args.threads: as given, else the cores idle now. Torch (in process: no --server) runs that many threads, unless
    OMP_NUM_THREADS says otherwise; the device head runs that many in onnxruntime. Returns the line that says so
    when fewer threads than cores run by default (printed once the run is checked), else None."""
    notice = None
    if args.threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.threads = idle_cores()
        if args.threads < cores:
            notice = (f"[threads] {args.threads} of {cores} cores idle now: running {args.threads} compute thread(s) "
                      "(--threads N to choose)")
    if not (args.artifacts and args.server) and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(args.threads)
    return notice


PREFILL_PROGRESS_FROM = 1024
"""Prompts of at least this many tokens show their prefill's progress (a 5,000-token prompt takes half a minute)."""


def _prefill_progress(done: int, total: int) -> None:
    if total >= PREFILL_PROGRESS_FROM:
        print(f"\r[prefill] {done}/{total} prompt positions", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _print_move(move) -> None:
    way = "shallower" if move.new < move.old else "deeper"
    print(f"\n[move] split {move.old} -> {move.new} ({way}) at {move.position} positions: {move.bytes / 2**20:.2f} MiB of KV "
          f"{'sent' if move.new < move.old else 'received'} in {move.seconds * 1e3:.0f} ms", file=sys.stderr, flush=True)


def _generate_from_artifacts(args, sampling):
    """ONNX head on the device side; for split plans, the tail on --server or else the exported tail in this
    process. Returns (run, tokenizer, split, L, plan, (chat template, spec))."""
    from splitlm.artifacts import export_side
    from splitlm.device.runtime import HeadSession, generate_device_only, generate_split, load_tokenizer
    from splitlm.model.chat import load_template

    root = args.artifacts
    session = HeadSession(export_side(root, "device"), threads=args.threads, verify=args.verify)
    check_against_export(args, session.plan)
    if session.plan.max_seq_len > session.spec.max_position:
        raise ConfigError(f"the export's plan allows {session.plan.max_seq_len} positions, past the {session.spec.max_position} "
                          f"the model was trained for; re-partition with --max-seq-len {session.spec.max_position} or less "
                          "and export again")
    tok = load_tokenizer(session.dir)
    L = session.spec.num_layers
    if session.device_only and args.server:
        raise ConfigError(f"--server: the export in {root} is device-only (split {L}/{L}), there is no cloud part to "
                          "run on a server; drop --server")
    args.speculate = args.speculate or session.plan.speculate
    if session.device_only and args.speculate:
        raise ConfigError(f"--speculate hides the round trips to the cloud, and the export in {root} is device-only "
                          f"(split {L}/{L}): drop --speculate")
    if session.device_only:
        run = lambda ids, show: generate_device_only(session, ids, args.max_tokens, sampling, show, tok,  # noqa: E731
                                                     on_prefill=_prefill_progress)
    else:
        if args.server:
            from splitlm.device.client import FailoverConfig, LinkConfig, ReplayingSession, connect
            from splitlm.device.uplink import adapts

            link = LinkConfig() if args.step_timeout is None else LinkConfig(step_timeout_s=args.step_timeout)
            channel = connect(args.server, args.tls_ca, link)  # a bad address or certificate file fails here
            failover = FailoverConfig() if args.failover_deadline is None else FailoverConfig(deadline_s=args.failover_deadline)

            def run(ids, show):
                with ReplayingSession(channel, session.plan.hash, session.plan.model_id, sampling, args.max_tokens,
                                      args.token, failover=failover, uplink=adapts(session.plan)) as remote:
                    result = generate_split(session, remote, ids, args.max_tokens, show, tok, on_move=_print_move,
                                            on_prefill=_prefill_progress, speculate=args.speculate)
                result.extra.update(bytes_up=remote.bytes_up, bytes_down=remote.bytes_down,
                                    replays=[dataclasses.asdict(r) for r in remote.replays])
                for r in remote.replays:
                    print(f"[failover] {r.reason}: replayed {r.frames} frames ({r.bytes} B) in {r.seconds:.2f} s, "
                          f"{r.attempts} attempt(s)", file=sys.stderr)
                return result
        else:
            from splitlm.cloud.tail import TailRunner

            tail = TailRunner(export_side(root, "cloud"), verify=args.verify)
            if tail.plan.hash != session.plan.hash:
                raise ConfigError(f"device plan {session.plan.hash} and cloud plan {tail.plan.hash} differ")
            tail_session = tail.new_session(sampling)
            run = lambda ids, show: generate_split(session, tail_session, ids, args.max_tokens, show, tok,  # noqa: E731
                                                   on_move=_print_move, on_prefill=_prefill_progress, speculate=args.speculate)
    return run, tok, session.plan.split_layer, L, session.plan, (load_template(session.dir), session.spec)


def cmd_eval(args) -> int:
    import json

    from splitlm import evaluate

    check_output(args.json, "--json")
    at_least(args.windows, 1, "--windows")
    at_least(args.window_size, 2, "--window-size")
    ckpt = load_model(args.model)
    plan, calibrated = plan_and_check_flags(args, ckpt)
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
    ratio = res.fp16_bytes_per_token / res.bytes_per_token if res.bytes_per_token else 0.0
    size = f"{ratio:.2f}x smaller than fp16" if ratio >= 1 else f"{1 / ratio:.2f}x larger than fp16"
    link = f"  link {res.bytes_per_token:.1f} B/token ({size})" if res.bytes_per_token else "  link none (device-only)"
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
    ckpt = load_model(args.model)
    plan, calibrated = plan_and_check_flags(args, ckpt)
    L = ckpt.spec.num_layers
    if args.accuracy_level != ACCURACY_LEVEL and not ((0 < plan.split_layer and plan.device_weights.bits != 16)
                                         or (plan.split_layer == L and plan.lm_head_bits != 16)):
        raise ConfigError(f"--accuracy-level {args.accuracy_level} would be ignored: it sets the quantized matmuls of "
                          "the device head, and this plan's device head has none")
    calib = None
    if calibrated:
        calib = evaluate.calibration_windows(ckpt.tokenizer(), args.calib_windows)
    try:
        cuts = [int(c) for c in args.segment_cuts.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--segment-cuts {args.segment_cuts!r}: give layer numbers separated by commas") from None
    bad = [c for c in cuts if not 0 < c < plan.split_layer]
    if bad:
        raise ConfigError(f"--segment-cuts {bad} are not inside the head's layers (0, {plan.split_layer})")
    result = export_artifacts(ckpt, plan, args.out, calib, accuracy_level=args.accuracy_level, segment_cuts=cuts)
    print(f"exported plan {plan.hash} (split {plan.split_layer}/{ckpt.spec.num_layers}) in {result.seconds:.1f}s")
    segments = f" in {len(cuts) + 1} segments" if cuts else ""
    print(f"  device: {result.device_dir}  head.onnx {result.head_bytes / 2**20:.1f} MiB{segments}")
    if result.cloud_dir is not None:
        print(f"  cloud:  {result.cloud_dir}  tail.safetensors {result.tail_bytes / 2**20:.1f} MiB")
    if args.check:
        worst = check_parity(ckpt, plan, result.device_dir, calib)
        print("  parity: " + ", ".join(f"{k} {v:.1e}" for k, v in list(worst.items())[:3]) + " (worst relative error) ok")
    return 0


def cmd_demo(args) -> int:
    from splitlm.demo import run_demo

    at_least(args.max_tokens, 1, "--max-tokens")
    run_demo(args.model, args.prompt, args.max_tokens, lambda text: print(text, end="", flush=True))
    return 0



"""The commands around the server and the plan search: serve, profile, partition."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from splitlm.cli.flags import at_least, check_output, dataclass_default, load_model, quantity, read_bytes, save_or_keep
from splitlm.errors import ConfigError

log = logging.getLogger("splitlm.serve")
STATS_EVERY_S = 60.0
"""`serve` logs its session count, moves served and KV bytes this often (INFO, event=stats)."""


def add_serve(sub) -> None:
    v = sub.add_parser("serve", help="serve the cloud tail of an export over gRPC")
    v.add_argument("--artifacts", required=True, help="an export directory (its cloud/ folder is served)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    v.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    v.add_argument("--token", default=None, help="require this bearer token")
    v.add_argument("--max-sessions", type=int, default=64, help="live sessions at most; more are RESOURCE_EXHAUSTED (default 64)")
    v.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS (with --tls-key)")
    v.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    v.add_argument("--verify", action="store_true", help="check the sha256 of every exported file (sizes are always checked)")
    v.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="what the tail computes in (default float32, the reference numbers): bfloat16 about halves "
                        "prefill time on a CPU with AVX512-BF16 or AMX, and suits a GPU; float16 runs on CUDA only")
    v.add_argument("--port-file", default=None, metavar="PATH",
                   help="once listening, write the bound port to PATH (atomically): how a script learns the port of --port 0")
    v.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: report NOT_SERVING, refuse new sessions, end live ones so that their devices replay "
                        "them on another replica, and exit once none is left or after this many seconds (default 30)")


def add_device_serve(sub) -> None:
    o = sub.add_parser("device-serve", help="an OpenAI-compatible HTTP endpoint on the device (/v1/chat/completions, "
                                            "/v1/completions, streaming), answered by the split session")
    o.add_argument("--artifacts", required=True, help="an export directory (its device/ folder runs here)")
    o.add_argument("--server", default=None, help="the cloud: HOST:PORT, or several separated by commas (replicas); "
                                                  "default: the export's cloud part in this process (full install)")
    o.add_argument("--host", default="127.0.0.1", help="address the HTTP endpoint listens on (default 127.0.0.1)")
    o.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    o.add_argument("--port-file", default=None, metavar="PATH", help="once listening, write the bound port to PATH")
    o.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every HTTP request")
    o.add_argument("--token", default=None, help="bearer token for the cloud server")
    o.add_argument("--tls-ca", default=None, help="PEM root certificates: reach the cloud over TLS")
    o.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the head (default: all cores)")


def cmd_device_serve(args) -> int:
    from splitlm.api import Device
    from splitlm.openai_server import OpenAIServer

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port: give 0..65535 (0 picks a free one)")
    check_output(args.port_file, "--port-file")
    device = Device(args.artifacts, args.server, token=args.token, tls_ca=args.tls_ca, threads=args.threads)
    server = OpenAIServer(device, args.host, args.port, args.api_key)
    if args.port_file:
        _write_port_file(args.port_file, server.port)
    print(f"OpenAI-compatible endpoint for {device.model_id} (split {device.plan.split_layer}) on "
          f"http://{args.host}:{server.port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        device.close()
    return 0


def add_profile(sub) -> None:
    from splitlm.model.registry import DEFAULT_MODEL

    pr = sub.add_parser("profile", help="measure device, cloud, codec and quality costs of a model: on this machine, or in "
                        "halves on two (--kit where the cloud runs, then --device on the device)")
    pr.add_argument("--model", default=None, help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    pr.add_argument("--out", required=True, help="where to write the profile JSON")
    pr.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    pr.add_argument("--bandwidth", default=None, help="link bandwidth in Mbit/s (default 50)")
    pr.add_argument("--rtt", default=None, help="link round-trip time (default 20ms)")
    pr.add_argument("--reps", type=int, default=None, help="timing repetitions (median; default 7)")
    pr.add_argument("--server", default=None, help="HOST:PORT of a running `splitlm serve`: probe the link's RTT against it")
    pr.add_argument("--kit", default=None, metavar="DIR",
                    help="two machines, the cloud's half (full install): write the calibration kit to DIR for the device "
                         "and the cloud's half of the profile to --out")
    pr.add_argument("--device", default=None, metavar="KIT",
                    help="two machines, the device's half (the device install is enough): measure this device on the "
                         "kit that --kit wrote and write the device's half to --out; `partition --profile DEVICE CLOUD` "
                         "merges the halves")
    pr.add_argument("--link-only", default=None, metavar="PROFILE",
                    help="measure nothing but the link (--server, or --bandwidth/--rtt given) and write PROFILE with it "
                         "to --out: re-profile a new network without re-measuring the model")


def add_partition(sub) -> None:
    """The partition command's flags."""
    from splitlm.partition.search import OBJECTIVES, Budgets

    pt = sub.add_parser("partition", help="choose a plan from a profile under memory and latency budgets")
    pt.add_argument("--profile", required=True, nargs="+", metavar="PROFILE",
                    help="a profile JSON (from `splitlm profile`, or written by hand), or the device's and the cloud's "
                         "halves (`profile --device` and `profile --kit`), merged")
    pt.add_argument("--device-memory", required=True, help="device memory budget, e.g. 64MB or 1.5GiB")
    pt.add_argument("--token-latency", required=True, help="per-token latency budget, e.g. 40ms")
    pt.add_argument("--ttft", default=None, help="time-to-first-token budget, e.g. 500ms")
    pt.add_argument("--max-seq-len", type=int, default=dataclass_default(Budgets, "max_seq_len"),
                    help="sequence length to plan for (default: longest that fits)")
    pt.add_argument("--prompt-tokens", type=int, default=dataclass_default(Budgets, "prompt_tokens"),
                    help="prompt length the TTFT is predicted for")
    pt.add_argument("--objective", choices=OBJECTIVES, default=dataclass_default(Budgets, "objective"),
                    help="what the chosen plan optimizes within the budgets: quality (perplexity) or latency "
                         f"(default {dataclass_default(Budgets, 'objective')})")
    tolerance = dataclass_default(Budgets, "quality_tolerance")
    pt.add_argument("--quality-tolerance", type=float, default=tolerance,
                    help="quality objective: perplexities within this fraction of the best count as equal and the "
                         f"fastest of them wins (default {tolerance})")
    pt.add_argument("--speculate", type=float, default=None, metavar="TOKENS_PER_ROUND_TRIP",
                    help="plan for speculation (split plans speculate): the decode tokens a round trip is expected to give, "
                         ">= 1 (`generate --speculate --json` reports it; 1.4 to 3.4 on lookup-friendly prompts, 1.0 to 1.1 "
                         "on open chat in bench/e2e.py --speculate)")
    pt.add_argument("--out", required=True, help="where to write the chosen plan")
    pt.add_argument("--top", type=int, default=10, help="Pareto candidates to print")
    pt.add_argument("--plot", default=None, help="write a Pareto plot (PNG/SVG/PDF) of the feasible plans here")


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
    at_least(args.max_sessions, 1, "--max-sessions")
    if not args.drain_timeout >= 0:
        raise ConfigError(f"--drain-timeout {args.drain_timeout} must be a number of seconds >= 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    check_output(args.port_file, "--port-file")
    credentials = tls_credentials(read_bytes(args.tls_cert), read_bytes(args.tls_key)) if args.tls_cert else None
    runner = TailRunner(export_side(args.artifacts, "cloud"), dtype=args.dtype, verify=args.verify)
    server, port, _ = start_server(runner, f"{args.host}:{args.port}",
                                   ServerConfig(max_sessions=args.max_sessions, auth_token=args.token), credentials)
    import signal
    import threading

    drain = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: drain.set())
    try:
        if args.port_file:
            _write_port_file(args.port_file, port)
        plan = runner.plan
        moves = f"; sessions start at {plan.split_layer} and may move to {plan.splits()}" if plan.split_moves else ""
        print(f"serving plan {plan.hash} (layers [{plan.cloud_start}, {runner.spec.num_layers}){moves}) on {args.host}:{port}",
              flush=True)
        service, last = server.service, time.monotonic()
        while not drain.wait(0.5):
            if time.monotonic() - last >= STATS_EVERY_S:  # what the replica serves, for logs and scrapers
                last = time.monotonic()
                log.info("event=stats sessions=%d moves=%d drained=%d kv_bytes=%d", len(service.sessions), service.moves,
                         service.drained, service.kv_bytes())
        # SIGTERM: graceful drain, then exit (the live sessions move to other replicas by replay)
        left = server.drain(args.drain_timeout)
        print(f"drained: {server.service.drained} session(s) moved, {left} left", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop(grace=2)
    return 0


def cmd_profile(args) -> int:

    from splitlm.device.client import probe_rtt_ms
    from splitlm.partition.profile import LinkProfile

    def mbps(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise ConfigError(f"--bandwidth is a number of Mbit/s > 0, got {text!r}")
        return value

    check_output(args.out, "--out")
    at_least(args.threads, 1, "--threads")
    at_least(args.reps, 1, "--reps")
    rtt = quantity(args.rtt, ("ms", "s"), "--rtt") if args.rtt is not None else None
    if args.server is not None and rtt is not None:
        raise ConfigError("--rtt would be ignored: --server probes the RTT; give one of them")
    modes = [f for f, v in (("--kit", args.kit), ("--device", args.device), ("--link-only", args.link_only)) if v]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)}: give one of them")
    if args.link_only:
        if args.server is None and args.bandwidth is None and rtt is None:
            raise ConfigError("--link-only needs --server, --bandwidth or --rtt: there is nothing else to measure")
        unused = [f for f, v in (("--model", args.model), ("--threads", args.threads), ("--reps", args.reps)) if v is not None]
        if unused:
            raise ConfigError(f"{', '.join(unused)} would be ignored: --link-only measures nothing but the link")
        return _relink(args, rtt, mbps)
    if args.device:
        return _profile_device(args, rtt, mbps)
    from splitlm.profiler import ProfileConfig, measure_profile  # needs torch: past the link-only path

    link = LinkProfile(mbps(args.bandwidth or "50"), 20.0 if rtt is None else rtt)
    if args.server:
        probe_rtt_ms(args.server, count=1)  # a server that is not there fails now, not after the measuring
    ckpt = load_model(args.model)
    t0 = time.perf_counter()
    phases: dict[str, dict] = {}
    partial = args.out + ".partial"
    config = ProfileConfig(threads=args.threads, reps=7 if args.reps is None else args.reps, server=args.server)
    if args.kit:
        from splitlm.partition.profile import save_part
        from splitlm.profiler import measure_cloud_half

        if args.server or args.bandwidth or rtt is not None:
            raise ConfigError("--server/--bandwidth/--rtt would be ignored: the link is the device's to measure "
                              "(profile --device KIT --server HOST:PORT)")
        kit = Path(args.kit)
        if kit.exists() and any(kit.iterdir()):
            raise ConfigError(f"--kit {kit} is not empty: give a new or empty directory")
        with _keeping_phases(partial, ckpt, phases):
            half = measure_cloud_half(ckpt, kit, config, on_phase=phases.__setitem__)
        save_or_keep(lambda path: save_part(half, path), args.out, "cloud profile")
        print(f"profiled the cloud's half of {ckpt.model_id} in {time.perf_counter() - t0:.0f} s -> {args.out}\n"
              f"calibration kit -> {kit} (copy it to the device, then: splitlm profile --device {kit.name} --server "
              f"HOST:PORT --out device.json)")
        return 0
    with _keeping_phases(partial, ckpt, phases):
        profile = measure_profile(ckpt, link, config, on_phase=phases.__setitem__)
    save_or_keep(profile.save, args.out, "profile")
    Path(partial).unlink(missing_ok=True)
    print(f"profiled {ckpt.model_id} in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


@contextlib.contextmanager
def _keeping_phases(partial: str, model, phases: dict[str, dict]):
    """On any failure inside the block, write what the finished phases measured to `partial`."""
    from splitlm.profiler import write_partial

    try:
        yield
    except BaseException as exc:
        if phases:
            try:
                write_partial(partial, model, phases, exc)
                note = f"what they measured is in {partial}"
            except OSError as err:
                note = f"saving what they measured to {partial} failed too: {err}"
            print(f"splitlm profile: stopped after {len(phases)} phases ({type(exc).__name__}); {note}", file=sys.stderr)
        raise


def _profile_device(args, rtt: float | None, mbps) -> int:
    """profile --device KIT: the device's half, torch-free."""
    from splitlm.partition.profile import LinkProfile, save_part
    from splitlm.profiler import measure_device_half
    from splitlm.profiler.kit import Kit

    if args.model is not None:
        raise ConfigError("--model would be ignored: --device measures the kit's model")
    kit = Kit.load(args.device)  # a wrong directory fails now, not after the link probe
    if args.server:
        from splitlm.device.client import probe_rtt_ms

        probe_rtt_ms(args.server, count=1)
    link = LinkProfile(mbps(args.bandwidth or "50"), 20.0 if rtt is None else rtt)
    t0, phases, partial = time.perf_counter(), {}, args.out + ".partial"
    with _keeping_phases(partial, kit, phases):
        half = measure_device_half(args.device, link, threads=args.threads, reps=args.reps, server=args.server,
                                   on_phase=phases.__setitem__)
    save_or_keep(lambda path: save_part(half, path), args.out, "device profile")
    Path(partial).unlink(missing_ok=True)
    print(f"profiled this device on the kit of {kit.model_id} in {time.perf_counter() - t0:.0f} s -> {args.out}\n"
          f"link: {half.link.bandwidth_mbps:g} Mbit/s, RTT {half.link.rtt_ms:.2f} ms")
    return 0


def _relink(args, rtt: float | None, mbps) -> int:
    """profile --link-only PROFILE: the link measured again, the rest of the profile (or device half) kept."""
    from splitlm.device.client import probe_rtt_ms
    from splitlm.partition.plan import read_json_object
    from splitlm.partition.profile import DeviceProfile, LinkProfile, Profile, load_part, save_part

    raw = read_json_object(args.link_only, "profile", ConfigError)
    if raw.get("kind") == DeviceProfile.kind:
        profile, save = load_part(args.link_only, raw), save_part
    elif raw.get("kind") is None:
        profile, save = Profile.load(args.link_only), Profile.save
    else:
        raise ConfigError(f"{args.link_only} is a {raw['kind']}: the link is in the device's half or a whole profile")
    if args.server:
        rtt = probe_rtt_ms(args.server)
    old = profile.link
    link = LinkProfile(mbps(args.bandwidth) if args.bandwidth else old.bandwidth_mbps, old.rtt_ms if rtt is None else rtt)
    save(dataclasses.replace(profile, link=link), args.out)
    print(f"link: {link.bandwidth_mbps:g} Mbit/s, RTT {link.rtt_ms:.2f} ms"
          + (f" (probed against {args.server})" if args.server else "") + f" -> {args.out}")
    return 0


def cmd_partition(args) -> int:
    from splitlm.partition.profile import load_profiles
    from splitlm.partition.search import Budgets, describe, search, to_plan

    check_output(args.out, "--out")
    check_output(args.plot, "--plot")
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {args.plot}: give a .png, .svg or .pdf file")
    at_least(args.max_seq_len, 1, "--max-seq-len")
    at_least(args.prompt_tokens, 1, "--prompt-tokens")
    profile = load_profiles(args.profile)
    budgets = Budgets(
        device_memory_bytes=quantity(args.device_memory, ("mb", "b", "kb", "gb", "kib", "mib", "gib"), "--device-memory"),
        token_latency_ms=quantity(args.token_latency, ("ms", "s"), "--token-latency"),
        ttft_ms=quantity(args.ttft, ("ms", "s"), "--ttft") if args.ttft else None,
        max_seq_len=args.max_seq_len, prompt_tokens=args.prompt_tokens, objective=args.objective,
        quality_tolerance=args.quality_tolerance, tokens_per_round_trip=args.speculate)
    t0 = time.perf_counter()
    result = search(profile, budgets)
    seconds = time.perf_counter() - t0
    if result.chosen is None:
        print(result.message, file=sys.stderr)
        return 3
    L = profile.num_layers
    front = sorted(result.pareto, key=lambda c: (c.perplexity, c.token_latency_ms) if args.objective == "quality"
                   else (c.token_latency_ms, c.perplexity))
    shown = front[: args.top]
    if result.chosen not in shown:  # the chosen plan is always in the table (it may trail the front's order)
        shown.append(result.chosen)
    width = max(len("plan"), *(len(describe(c, L)) for c in shown)) + 2
    print(f"  {'plan':<{width}}{'MiB':>8}{'ms/tok':>9}{'TTFT ms':>9}{'B/tok':>8}{'ppl':>9}")
    for c in shown:
        mark = "* " if c == result.chosen else "  "
        print(f"{mark}{describe(c, L):<{width}}{c.memory_bytes / 2**20:>8.1f}{c.token_latency_ms:>9.1f}{c.ttft_ms:>9.0f}"
              f"{c.bytes_per_token:>8.0f}{c.perplexity:>9.3f}")
    print(result.message)
    print(f"searched {result.evaluated} configurations in {seconds:.2f} s")
    save_or_keep(to_plan(result.chosen, profile, budgets).save, args.out, "plan")
    print(f"wrote {args.out}")
    if args.plot:
        from splitlm.partition.plot import pareto_plot

        pareto_plot(result, L, args.plot, f"{profile.model_id}", budgets)
        print(f"wrote {args.plot}")
    return 0



"""End to end on an emulated link: device and cloud in two network namespaces joined by a
veth pair shaped with netem (delay, rate), for a split plan, cloud-only (ℓ = 0) and device-only
(ℓ = L). Prints TTFT and decode tokens/s; writes JSON. Needs root (ip netns, tc); without it,
it says so and runs over loopback, unshaped.

    sudo .venv/bin/python bench/e2e.py [--tokens 32] [--json bench/results/e2e.json]
    sudo .venv/bin/python bench/e2e.py --speculate [--tokens 64] [--cloud-dtype bfloat16] [--json bench/results/speculation.json]

With --speculate: the split plan on the 20 ms / 50 Mbit/s link only, each prompt generated with and without
`--speculate`, alternating, median of --reps: tokens/s, TTFT, tokens per round trip, drafts kept, and whether
the two outputs are equal. The prompts are lookup-friendly (summarize or edit a given text, continue code: asked in
chat, and as raw code completion) and open chat (SPECULATION_PROMPTS); each set is also reported as a whole (its
decoded tokens over its decode time).

Both namespaces share this machine's cores: the device's onnxruntime and the cloud's torch
compete for them, which a real deployment would not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from splitlm.demo import cached_export, default_plan
from splitlm.model.registry import resolve_model
from splitlm.quantize.config import CodecConfig, WeightQuant

DEV_NS, CLOUD_NS = "slm-bench-dev", "slm-bench-cloud"
DEV_IP, CLOUD_IP = "10.213.7.1", "10.213.7.2"
LINKS = [("20 ms RTT, 50 Mbit/s", 10.0, 50), ("5 ms RTT, 200 Mbit/s", 2.5, 200)]
SPLITLM = str(Path(sys.executable).with_name("splitlm"))
PROMPT = "Explain in a few sentences why the sky is blue."
_TEXT = ("The city council met on Tuesday to discuss the new park. The park will have a playground, a pond and a "
         "walking trail. Construction will start in the spring and should finish by the end of the year. The council "
         "said the park will be open to everyone and free to visit.")
_CODE = ("def mean(values):\n    total = 0\n    for value in values:\n        total += value\n    return total / len(values)\n\n\n"
         "def variance(values):\n    m = mean(values)\n    total = 0\n    for value in values:\n")
SPECULATION_PROMPTS = {
    "summarize (lookup)": f"Summarize this text in two sentences:\n\n{_TEXT}",
    "edit (lookup)": f"Rewrite this text, changing 'park' to 'garden' and nothing else:\n\n{_TEXT}",
    "code, chat (lookup)": f"Continue this Python code:\n\n{_CODE}",
    "code completion (lookup)": _CODE.rstrip("\n"),
    "chat: tips (open)": "What are three tips for staying healthy?",
    "chat: poem (open)": "Write a short poem about the sea.",
}
RAW_PROMPTS = {"code completion (lookup)"}
"""Prompts generated as raw text, not in the chat template: code completion as an editor asks for it (the chat
model, asked in chat to continue code, rewrites it instead: "code, chat"). The completion's prompt ends at the end
of a line, not after its newline: the tokenizer merges a newline with the next line's indent, so a prompt cut
after the newline leaves the model a token boundary it never saw (SmolLM2 then starts its answer with "#")."""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    try:
        teardown()
        sh("ip", "netns", "add", DEV_NS)
        sh("ip", "netns", "add", CLOUD_NS)
        sh("ip", "link", "add", "slmdev0", "netns", DEV_NS, "type", "veth", "peer", "name", "slmcloud0", "netns", CLOUD_NS)
        for ns, dev, ip in ((DEV_NS, "slmdev0", DEV_IP), (CLOUD_NS, "slmcloud0", CLOUD_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return True
    except subprocess.CalledProcessError as exc:
        print(f"cannot make network namespaces ({exc.stderr.strip()}); falling back to loopback", file=sys.stderr)
        teardown()
        return False


def shape(one_way_ms: float, mbit: int) -> str:
    """Shape both ends: netem delay + rate when the kernel has netem, else tbf rate in the kernel
    and the delay in a userspace relay (returns which)."""
    try:
        for ns, dev in ((DEV_NS, "slmdev0"), (CLOUD_NS, "slmcloud0")):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
               "delay", f"{one_way_ms}ms", "rate", f"{mbit}mbit")
        return "netem"
    except subprocess.CalledProcessError:
        for ns, dev in ((DEV_NS, "slmdev0"), (CLOUD_NS, "slmcloud0")):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
               "rate", f"{mbit}mbit", "burst", "64kbit", "latency", "200ms")
        return "tbf+relay"


def start_relay(one_way_ms: float) -> subprocess.Popen:
    """The device reaches the cloud through 127.0.0.1:50552 in its namespace, delayed both ways."""
    relay = str(Path(__file__).with_name("delay_relay.py"))
    proc = subprocess.Popen(in_ns(DEV_NS, sys.executable, relay, "127.0.0.1:50552", f"{CLOUD_IP}:50551", str(one_way_ms)),
                            stdout=subprocess.PIPE, text=True)
    if "relaying" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("the delay relay did not start")
    return proc


def teardown() -> None:
    for ns in (DEV_NS, CLOUD_NS):
        sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def emulated_link(one_way_ms: float, mbit: float):
    """The namespaces (made by make_namespaces) shaped to one link: yields (how it is shaped, the address the
    device reaches the cloud's server on, port 50551); the relay stops and the namespaces go at the end."""
    relay = None
    try:
        how = shape(one_way_ms, mbit)
        if how == "tbf+relay":
            relay = start_relay(one_way_ms)
        yield how, "127.0.0.1:50552" if relay else f"{CLOUD_IP}:50551"
    finally:
        if relay:
            relay.terminate()
        teardown()


def in_ns(ns: str | None, *cmd: str) -> list[str]:
    return (["ip", "netns", "exec", ns] if ns else []) + list(cmd)


def run_generate(artifacts: Path, tokens: int, server: str | None, ns: str | None, prompt: str = PROMPT,
                 extra: tuple[str, ...] = (), chat: bool = True) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [SPLITLM, "generate", "--artifacts", str(artifacts), "--prompt", prompt, *(["--chat"] if chat else []),
               "--max-tokens", str(tokens), "--json", out.name, *extra]
        if server:
            cmd += ["--server", server]
        proc = subprocess.run(in_ns(ns, *cmd), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"generate failed: {proc.stderr.strip()[-500:]}")
        return json.loads(Path(out.name).read_text())


def serve(artifacts: Path, ns: str | None, host: str, extra: tuple[str, ...] = (), threads: int | None = None) -> subprocess.Popen:
    """`splitlm serve` (with `extra` flags; `threads`: its torch threads, default all cores) in namespace `ns`, once
    it says it is serving (its log, one INFO line per session, goes to a temporary file: a pipe nobody reads would
    fill and stop it)."""
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen(in_ns(ns, SPLITLM, "serve", "--artifacts", str(artifacts), "--host", host, "--port", "50551", *extra),
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        log.seek(0)
        raise RuntimeError(f"server did not start: {line}{log.read()[-500:]}")
    return proc


def speculation(args, ckpt) -> None:
    """The split plan on the 20 ms link, each prompt with and without --speculate (module docstring)."""
    root = cached_export(ckpt, default_plan(ckpt))
    netns = make_namespaces()
    link, one_way, mbit = LINKS[0] if netns else ("loopback (no namespaces)", 0.0, 0)
    relay, how, rows = None, "loopback", []
    try:
        if netns:
            how = shape(one_way, mbit)
            if how == "tbf+relay":
                relay = start_relay(one_way)
        server_proc = serve(root, CLOUD_NS if netns else None, CLOUD_IP if netns else "127.0.0.1", ("--dtype", args.cloud_dtype))
        target = "127.0.0.1:50552" if relay else f"{CLOUD_IP if netns else '127.0.0.1'}:50551"
        try:
            for name, prompt in SPECULATION_PROMPTS.items():
                runs: dict[bool, list[dict]] = {False: [], True: []}
                for _ in range(args.reps):
                    for spec in (False, True):
                        runs[spec].append(run_generate(root, args.tokens, target, DEV_NS if netns else None, prompt,
                                                       ("--speculate",) if spec else (), chat=name not in RAW_PROMPTS))
                row = {"prompt": name, "equal": all(a["tokens"] == b["tokens"] for a, b in zip(runs[False], runs[True]))}
                for spec, key in ((False, "plain"), (True, "speculative")):
                    row[key] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[spec]),
                                "ttft_ms": statistics.median(r["ttft_s"] for r in runs[spec]) * 1e3,
                                "tokens_per_round_trip": statistics.median(r["tokens_per_round_trip"] for r in runs[spec]),
                                "tokens": len(runs[spec][0]["tokens"])}
                row["speculative"]["drafts_kept"] = f"{runs[True][0]['accepted']}/{runs[True][0]['drafted']}"
                row["speedup"] = row["speculative"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
                rows.append(row)
                print(f"  {name:<26} {row['plain']['tokens_per_s']:6.1f} -> {row['speculative']['tokens_per_s']:6.1f} tok/s "
                      f"({row['speedup']:.2f}x), {row['speculative']['tokens_per_round_trip']:.2f} tokens/round trip, "
                      f"equal {row['equal']}", file=sys.stderr, flush=True)
        finally:
            server_proc.terminate()
            server_proc.wait(10)
    finally:
        if relay:
            relay.terminate()
        if netns:
            teardown()
    raw = ", ".join(sorted(RAW_PROMPTS))
    print(f"SmolLM2 split {default_plan(ckpt).split_layer}, {link}, {args.tokens} tokens (chat template but for {raw}), "
          f"median of {args.reps}, plain and speculative alternating; link shaping: {how}; cloud in {args.cloud_dtype}")
    print(f"{'prompt':<26}{'plain tok/s':>12}{'spec tok/s':>12}{'speedup':>9}{'tok/RT':>8}{'kept':>9}{'TTFT plain':>12}"
          f"{'TTFT spec':>11}{'equal':>7}")
    for r in rows:
        p, q = r["plain"], r["speculative"]
        print(f"{r['prompt']:<26}{p['tokens_per_s']:>12.1f}{q['tokens_per_s']:>12.1f}{r['speedup']:>8.2f}x"
              f"{q['tokens_per_round_trip']:>8.2f}{q['drafts_kept']:>9}{p['ttft_ms']:>12.0f}{q['ttft_ms']:>11.0f}{str(r['equal']):>7}")
    sets = {kind: prompt_set(rows, kind) for kind in ("lookup", "open")}
    for kind, s in sets.items():
        print(f"{kind} set ({len(s['prompts'])} prompts): {s['plain_tokens_per_s']:.1f} -> {s['speculative_tokens_per_s']:.1f} "
              f"tok/s, {s['speedup']:.2f}x; per prompt {s['min_speedup']:.2f}x to {s['max_speedup']:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"netns": netns, "shaping": how, "link": link, "cloud_dtype": args.cloud_dtype, "rows": rows,
                                           "sets": sets}, indent=2))


def prompt_set(rows: list[dict], kind: str) -> dict:
    """The prompts labelled "(kind)" taken together: their decoded tokens over their decode time (a generation's
    tokens/s counts the tokens after its first), plain and speculative."""
    mine = [r for r in rows if r["prompt"].endswith(f"({kind})")]
    rate = {key: sum(r[key]["tokens"] - 1 for r in mine) / sum((r[key]["tokens"] - 1) / r[key]["tokens_per_s"] for r in mine)
            for key in ("plain", "speculative")}
    return {"prompts": [r["prompt"] for r in mine], "plain_tokens_per_s": rate["plain"],
            "speculative_tokens_per_s": rate["speculative"], "speedup": rate["speculative"] / rate["plain"],
            "min_speedup": min(r["speedup"] for r in mine), "max_speedup": max(r["speedup"] for r in mine)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per generation (default 32; 64 with --speculate)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--speculate", action="store_true", help="speculative against plain decoding (module docstring)")
    ap.add_argument("--cloud-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="with --speculate: what the cloud computes in (serve --dtype; default float32)")
    ap.add_argument("--json", default=None, help="default bench/results/e2e.json (speculation.json with --speculate, "
                                                 "speculation_bfloat16.json with --cloud-dtype bfloat16)")
    args = ap.parse_args()
    if args.cloud_dtype != "float32" and not args.speculate:
        ap.error("--cloud-dtype goes with --speculate")
    ckpt = resolve_model("smollm2-135m")
    if args.speculate:
        args.tokens = args.tokens or 64
        args.json = args.json or ("bench/results/speculation.json" if args.cloud_dtype == "float32" else
                                  f"bench/results/speculation_{args.cloud_dtype}.json")
        return speculation(args, ckpt)
    args.tokens = args.tokens or 32
    args.json = args.json or "bench/results/e2e.json"
    L = ckpt.spec.num_layers
    split = default_plan(ckpt)
    plans = {
        f"split ℓ={split.split_layer}": split,
        "cloud-only ℓ=0": split.replace(split_layer=0, device_weights=WeightQuant(16)),
        f"device-only ℓ={L}": split.replace(split_layer=L, device_weights=WeightQuant(8, 32), lm_head_bits=8,
                                            codec=CodecConfig("fp16")),
    }
    exports = {name: cached_export(ckpt, plan) for name, plan in plans.items()}
    netns = make_namespaces()
    links = LINKS if netns else [("loopback (no namespaces)", 0.0, 0)]
    rows = []
    relay = None
    how = "loopback"
    try:
        for link, one_way, mbit in links:
            if relay:
                relay.terminate()
                relay = None
            if netns:
                how = shape(one_way, mbit)
                if how == "tbf+relay":
                    relay = start_relay(one_way)
            for name, root in exports.items():
                server_proc = None
                if plans[name].split_layer < L:
                    server_proc = serve(root, CLOUD_NS if netns else None, CLOUD_IP if netns else "127.0.0.1")
                try:
                    target = "127.0.0.1:50552" if relay else f"{CLOUD_IP if netns else '127.0.0.1'}:50551"
                    address = target if server_proc else None
                    runs = [run_generate(root, args.tokens, address, DEV_NS if netns else None) for _ in range(args.reps)]
                finally:
                    if server_proc:
                        server_proc.terminate()
                        server_proc.wait(10)
                ttft = statistics.median(r["ttft_s"] for r in runs) * 1e3
                tps = statistics.median(r["tokens_per_s"] for r in runs)
                bpt = statistics.median(r["link_bytes"] / (r["prompt_tokens"] + len(r["tokens"]) - 1) for r in runs)
                rows.append({"link": link, "plan": name, "ttft_ms": ttft, "tokens_per_s": tps, "bytes_per_position": bpt})
                print(f"{link:<26}{name:<20}{ttft:>10.0f}{tps:>12.1f}{bpt:>10.0f}", file=sys.stderr, flush=True)
    finally:
        if relay:
            relay.terminate()
        if netns:
            teardown()
    print(f"SmolLM2, prompt '{PROMPT}' (chat), {args.tokens} tokens, median of {args.reps}; link shaping: {how}"
          + ("" if netns else " — loopback only: no namespaces could be made")
          + (" (this kernel has no netem: rate by tbf on the veth, delay by bench/delay_relay.py)" if how == "tbf+relay" else ""))
    print(f"{'link':<26}{'plan':<20}{'TTFT ms':>10}{'tokens/s':>12}{'B/pos up':>10}")
    for r in rows:
        print(f"{r['link']:<26}{r['plan']:<20}{r['ttft_ms']:>10.0f}{r['tokens_per_s']:>12.1f}{r['bytes_per_position']:>10.0f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"netns": netns, "shaping": how, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

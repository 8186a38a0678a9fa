"""Two `splitlm serve` replicas of the default SmolLM2 split, reached by gRPC's client-side round_robin
(`--server a,b`) and through nginx (deploy/nginx-splitlm.conf), with the replica serving a session
SIGKILLed mid-generation: the output must equal the unbroken run's, and the table gives the recovery
time (kill -> next token) and the bytes replayed.

    .venv/bin/python bench/replicas.py [--tokens 48] [--kill-at 16] [--json bench/results/replicas.json]

nginx is optional (apt-get install nginx); without it that row is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from splitlm.demo import cached_export, default_plan
from splitlm.model.registry import resolve_model

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx-splitlm.conf"


class Replica:
    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.start()

    def start(self) -> None:
        port_file = Path(tempfile.mkdtemp()) / "port"
        self.proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "-v", "serve", "--artifacts", str(self.root),
                                      "--port", "0", "--port-file", str(port_file)],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("a"), env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())

    def holds(self, session_id: str) -> bool:
        return f"session={session_id}" in self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def start_nginx(ports: list[int], workdir: Path) -> tuple[subprocess.Popen, int] | None:
    """nginx from the shipped config, with these replica ports and a free listening port; None without nginx."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        listen = s.getsockname()[1]
    conf = TEMPLATE.read_text().replace("127.0.0.1:50061", f"127.0.0.1:{ports[0]}").replace(
        "127.0.0.1:50062", f"127.0.0.1:{ports[1]}").replace("127.0.0.1:50051", f"127.0.0.1:{listen}").replace(
        "/tmp/splitlm-nginx.pid", str(workdir / "nginx.pid"))
    (workdir / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=(workdir / "nginx.log").open("w"))
    time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit(f"nginx did not start: {(workdir / 'nginx.log').read_text()[-2000:]}")
    return proc, listen


def run(head, plan, address: str, prompt: list[int], n: int, replicas: list[Replica], kill_at: int | None) -> dict:
    from splitlm.device.client import ReplayingSession, connect
    from splitlm.device.runtime import generate_split
    from splitlm.sampling import SamplingParams

    with connect(address) as channel, ReplayingSession(channel, plan.hash, plan.model_id, SamplingParams(), n) as remote:
        tokens, marks = [0], {}

        def send(frame, rows, want_token):
            if want_token and tokens[0] == kill_at:
                serving = [r for r in replicas if r.holds(remote.remote.info.session_id)]
                serving[0].kill()
                marks["killed"] = time.perf_counter()
            answer = remote.send(frame, rows, want_token)
            if want_token:
                tokens[0] += 1
                if "killed" in marks and "next" not in marks:
                    marks["next"] = time.perf_counter()
            return answer

        t0 = time.perf_counter()
        result = generate_split(head, send, prompt, n)
        seconds = time.perf_counter() - t0
    replay = remote.replays[0] if remote.replays else None
    return {"tokens": result.token_ids, "seconds": seconds, "tokens_per_s": len(result.token_ids) / seconds,
            "recovery_ms": (marks["next"] - marks["killed"]) * 1e3 if "next" in marks else None,
            "replay_frames": replay.frames if replay else 0, "replay_bytes": replay.bytes if replay else 0,
            "replay_attempts": replay.attempts if replay else 0}


def main() -> None:
    from splitlm.device.runtime import HeadSession

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--kill-at", type=int, default=16, help="kill the serving replica before this token")
    ap.add_argument("--json", default="bench/results/replicas.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    plan = default_plan(ckpt)
    root = cached_export(ckpt, plan)
    head = HeadSession(root / "device", threads=1)
    prompt = ckpt.tokenizer().encode("Replicas of the cloud tail share the sessions of many devices. " * 6).ids
    work = Path(tempfile.mkdtemp())
    replicas = [Replica(root, work / f"replica{i}.log") for i in range(2)]
    rows, notes = [], []
    try:
        nginx = start_nginx([r.port for r in replicas], work)
        ways = [("client round_robin (--server a,b)", lambda: ",".join(f"127.0.0.1:{r.port}" for r in replicas))]
        if nginx is None:
            notes.append("nginx: not installed (apt-get install nginx adds the row)")
        else:
            ways.append(("nginx grpc_pass", lambda: f"127.0.0.1:{nginx[1]}"))
        for name, address in ways:
            ref = run(head, plan, address(), prompt, args.tokens, replicas, None)
            got = run(head, plan, address(), prompt, args.tokens, replicas, args.kill_at)
            same = got["tokens"] == ref["tokens"]
            rows.append({"way": name, "identical": same, "unbroken_tokens_per_s": ref["tokens_per_s"], **{
                k: v for k, v in got.items() if k != "tokens"}})
            for r in replicas:  # bring the killed one back on its port (nginx's upstream list is fixed)
                if r.proc.poll() is not None:
                    old = r.port
                    r.start()
                    if nginx is not None and r.port != old:
                        nginx[0].terminate()
                        nginx[0].wait(10)
                        nginx = start_nginx([x.port for x in replicas], work)
    finally:
        for r in replicas:
            r.kill()
        if nginx is not None:
            nginx[0].terminate()
    print(f"SmolLM2-135M split {plan.split_layer}/{ckpt.spec.num_layers}, 2 replicas on loopback, {len(prompt)}-token "
          f"prompt, {args.tokens} tokens greedy, the serving replica SIGKILLed before token {args.kill_at}")
    print(f"{'way':<36}{'same output':>12}{'tok/s unbroken':>16}{'tok/s killed':>14}{'recovery ms':>13}{'replayed':>16}")
    for r in rows:
        print(f"{r['way']:<36}{str(r['identical']):>12}{r['unbroken_tokens_per_s']:>16.1f}{r['tokens_per_s']:>14.1f}"
              f"{r['recovery_ms'] or 0:>13.0f}{r['replay_frames']:>6} fr {r['replay_bytes'] / 1024:>5.1f} KiB")
    for note in notes:
        print(f"({note})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"plan": plan.hash, "prompt_tokens": len(prompt), "tokens": args.tokens,
                                           "kill_at": args.kill_at, "rows": rows, "skipped": notes}, indent=2))
    if not all(r["identical"] for r in rows):
        raise SystemExit("output after a failover differs from the unbroken run")


if __name__ == "__main__":
    main()

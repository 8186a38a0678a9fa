"""The wire: bytes, quality and speed of each activation codec point, and TTFT on a slow uplink.

    sudo .venv/bin/python bench/wire.py [--json bench/results/wire.json] [--no-link]

1. Quality and size, SmolLM2 split at 10: bytes/token (every byte counted) and perplexity on the
   protocol text and on a second corpus the codec was never tuned on (GPL-3 from
   /usr/share/common-licenses, 8 windows each), for fp16, fixed-width TS + TAB-Q and the default
   transform coder with ANS at several ε. Perplexity is set against the fp32 link's on the same windows.
2. Speed on real activations (layer 10, calibration text): the device's numpy encoder per decode row and
   per 128-row prefill chunk, and the cloud's decoder for the same (medians).
3. TTFT of a 1,024-token prompt on an emulated 5 Mbit/s link with 50 ms RTT (network namespaces, tbf and
   the delay relay of bench/e2e.py): the same split plan exported with an fp16 link and with the default
   codec, median of 3 runs each, in one run, with the cloud computing in float32 and in bfloat16 (`serve
   --dtype`); the device and the server get one core each. Beside them, each cloud's compute floor: the
   codec's TTFT on no link at all (the device in the server's namespace), which no codec can beat on this
   machine. Needs root; without it (or with --no-link) it is skipped.

The KV codec for moves: bench/kv_wire.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the namespace/link harness)

from splitlm import corpus, evaluate  # noqa: E402
from splitlm.demo import cached_export  # noqa: E402
from splitlm.model.registry import resolve_model  # noqa: E402
from splitlm.partition.plan import Plan  # noqa: E402
from splitlm.profiler.timing import median_ms  # noqa: E402
from splitlm.quantize import codec  # noqa: E402
from splitlm.quantize.config import CodecConfig, WeightQuant  # noqa: E402

SPLIT = 10
SECOND_CORPUS = Path("/usr/share/common-licenses/GPL-3")
POINTS = {
    "fp16": CodecConfig("fp16"),
    "TS+TAB-Q eps 0.035 (fixed width)": CodecConfig("tabq", error_budget=0.035, entropy="none"),
    "ans eps 0.02": CodecConfig("tabq", error_budget=0.02),
    "ans eps 0.03 (tabq default)": CodecConfig("tabq"),
    "ans eps 0.05": CodecConfig("tabq", error_budget=0.05),
}
LINK = (25.0, 5)  # one-way ms, Mbit/s: 50 ms RTT at 5 Mbit/s


def quality(ckpt, windows: int) -> list[dict]:
    tok = ckpt.tokenizer()
    texts = {"protocol": corpus.windows(tok, corpus.protocol_text(), windows)}
    if SECOND_CORPUS.exists():
        texts["GPL-3"] = corpus.windows(tok, SECOND_CORPUS.read_text(), windows)
    else:
        print(f"{SECOND_CORPUS} is missing: the second corpus is skipped", file=sys.stderr)
    rows = []
    for text, wins in texts.items():
        base = evaluate.evaluate_plan(ckpt, Plan(ckpt.model_id, ckpt.weights_hash, SPLIT, codec=CodecConfig("fp32")), wins,
                                      progress=False).perplexity
        for name, cfg in POINTS.items():
            q = evaluate.evaluate_plan(ckpt, Plan(ckpt.model_id, ckpt.weights_hash, SPLIT, codec=cfg), wins, progress=False)
            rows.append({"text": text, "codec": name, "bytes_per_token": q.bytes_per_token, "x_vs_fp16": q.fp16_bytes_per_token / q.bytes_per_token,
                         "perplexity": q.perplexity, "fp32_perplexity": base, "delta_pct": 100 * (q.perplexity / base - 1)})
            print(f"  {text:<9}{name:<34}{q.bytes_per_token:>8.1f}{rows[-1]['x_vs_fp16']:>7.2f}x{q.perplexity:>9.3f}"
                  f"{rows[-1]['delta_pct']:>+8.2f}%", file=sys.stderr, flush=True)
    return rows


def speed(ckpt) -> list[dict]:
    import torch

    from splitlm.stages import build_stages, codec_bases

    plan = Plan(ckpt.model_id, ckpt.weights_hash, SPLIT, codec=CodecConfig("tabq"))
    head, _ = build_stages(ckpt, plan, tail=False)
    basis = codec_bases(ckpt, plan, head)[SPLIT]
    wins = corpus.windows(ckpt.tokenizer(), corpus.protocol_text(), 1)
    with torch.inference_mode():
        h = head(torch.tensor(wins))[0].numpy()
    rows = []
    for name, cfg in POINTS.items():
        b = basis if codec.frame_kind(cfg) == "ans" else None
        row, chunk = h[100:101], h[:128]
        f_row, f_chunk = codec.encode(row, cfg, "numpy", b), codec.encode(chunk, cfg, "numpy", b)
        # a batcher turn with 64 sessions decoding: 64 one-row frames decoded by one decode_many call
        f_turn = [codec.encode(h[i:i + 1], cfg, "numpy", b) for i in range(100, 164)]
        lays = [codec.parse_frame(f) for f in f_turn]
        rows.append({"codec": name,
                     # per decode row: the median over 16 rows of text of each row's median (one row alone swings
                     # with what its values make the search do)
                     "encode_row_ms": statistics.median(median_ms(lambda r=r: codec.encode(r, cfg, "numpy", b), 25)
                                                        for r in (h[i:i + 1] for i in range(100, 116))),
                     "encode_chunk_ms": median_ms(lambda: codec.encode(chunk, cfg, "numpy", b), 10),
                     "decode_row_ms": median_ms(lambda: codec.decode(f_row, "torch", bases=b), 200),
                     "decode_chunk_ms": median_ms(lambda: codec.decode(f_chunk, "torch", bases=b), 10),
                     "decode_turn64_ms_per_row": median_ms(lambda: codec.decode_many(f_turn, "torch", lays, bases=b), 10) / 64,
                     "row_frame_bytes": len(f_row), "chunk_frame_bytes": len(f_chunk)})
        r = rows[-1]
        print(f"  {name:<34}{r['encode_row_ms']:>9.3f}{r['encode_chunk_ms']:>10.2f}{r['decode_row_ms']:>9.3f}"
              f"{r['decode_chunk_ms']:>10.2f}{r['decode_turn64_ms_per_row']:>9.3f}", file=sys.stderr, flush=True)
    return rows


def ttft(ckpt, reps: int) -> dict:
    """TTFT of a 1,024-token prompt on the emulated link, fp16 against the default codec, in one run, with the cloud
    computing in float32 and in bfloat16 (`serve --dtype`). Each side gets one core (the device `--threads 1`, the
    server one torch thread), as a device and a server of their own would. The compute floor of each: the codec's
    TTFT with the device beside the server, on no link at all; no codec brings TTFT below it on this machine."""
    tok = ckpt.tokenizer()
    ids = corpus.windows(tok, corpus.protocol_text(), 3)[2] * 2  # 1,024 tokens of protocol text
    prompt = tok.decode(ids)
    base = Plan(ckpt.model_id, ckpt.weights_hash, SPLIT, device_weights=WeightQuant(8, 32), cloud_weights=WeightQuant(8, 32),
                max_seq_len=2048, prefill_chunk=128)
    exports = {name: cached_export(ckpt, base.replace(codec=cfg)) for name, cfg in
               (("fp16", CodecConfig("fp16")), (CODEC_ROW, CodecConfig("tabq")))}
    if not e2e.make_namespaces():
        return {"skipped": "no network namespaces (needs root, ip and tc)"}
    out = {"link": f"{2 * LINK[0]:.0f} ms RTT, {LINK[1]} Mbit/s", "rows": [], "ratio": {}, "floor_ratio": {}}
    beside = f"{e2e.CLOUD_IP}:50551"  # the server's own address, from its own namespace: no link
    with e2e.emulated_link(*LINK) as (how, target):
        out["shaping"] = how
        for dtype in CLOUD_DTYPES:
            for name, root in exports.items():
                server = e2e.serve(root, e2e.CLOUD_NS, e2e.CLOUD_IP, ("--dtype", dtype), threads=1)
                try:
                    for where, ns, address in (("link", e2e.DEV_NS, target), ("no link", e2e.CLOUD_NS, beside)):
                        if where == "no link" and name == "fp16":
                            continue
                        runs = [e2e.run_generate(root, 4, address, ns, prompt, ("--threads", "1"), chat=False) for _ in range(reps)]
                        row = {"cloud_dtype": dtype, "codec": name, "where": where, "prompt_tokens": runs[0]["prompt_tokens"],
                               "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1e3,
                               "bytes_up": statistics.median(r.get("bytes_up", r["link_bytes"]) for r in runs)}
                        out["rows"].append(row)
                        print(f"  {dtype:<9}{name:<30}{where:<8}{row['prompt_tokens']:>6}{row['ttft_ms']:>8.0f}{row['bytes_up']:>10.0f}",
                              file=sys.stderr, flush=True)
                finally:
                    server.terminate()
                    server.wait(10)
            ms = {(r["codec"], r["where"]): r["ttft_ms"] for r in out["rows"] if r["cloud_dtype"] == dtype}
            out["ratio"][dtype] = ms[CODEC_ROW, "link"] / ms["fp16", "link"]
            out["floor_ratio"][dtype] = ms[CODEC_ROW, "no link"] / ms["fp16", "link"]
    return out


CLOUD_DTYPES = ("float32", "bfloat16")
CODEC_ROW = "ans eps 0.03 (tabq default)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows per text (0 = skip the quality table)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-link", action="store_true", help="skip the TTFT on the emulated link")
    ap.add_argument("--json", default="bench/results/wire.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    print("quality and size (text, codec, B/token, x smaller than fp16, perplexity, vs the fp32 link):", file=sys.stderr)
    q = quality(ckpt, args.windows) if args.windows else []
    print("speed (codec, encode ms per row, per 128-row chunk, decode ms per row, per chunk):", file=sys.stderr)
    s = speed(ckpt)
    link = {"skipped": "--no-link"} if args.no_link else None
    if link is None:
        print("TTFT of a 1,024-token prompt, 50 ms RTT / 5 Mbit/s (cloud dtype, codec, path, prompt tokens, TTFT ms, bytes up):",
              file=sys.stderr)
        link = ttft(ckpt, args.reps)
    print(f"\nSmolLM2 split {SPLIT}, {args.windows} windows per text; B/token counts every byte (headers, side information)")
    print(f"{'text':<10}{'codec':<34}{'B/token':>9}{'vs fp16':>9}{'ppl':>9}{'Δ ppl':>9}")
    for r in q:
        print(f"{r['text']:<10}{r['codec']:<34}{r['bytes_per_token']:>9.1f}{r['x_vs_fp16']:>8.2f}x{r['perplexity']:>9.3f}"
              f"{r['delta_pct']:>+8.2f}%")
    print(f"\n{'codec':<34}{'enc ms/row':>11}{'enc ms/128':>11}{'dec ms/row':>11}{'dec ms/128':>11}{'dec ms/row, 64 in a turn':>25}"
          f"{'B/row frame':>12}")
    for r in s:
        print(f"{r['codec']:<34}{r['encode_row_ms']:>11.3f}{r['encode_chunk_ms']:>11.2f}{r['decode_row_ms']:>11.3f}"
              f"{r['decode_chunk_ms']:>11.2f}{r['decode_turn64_ms_per_row']:>25.3f}{r['row_frame_bytes']:>12}")
    if "rows" in link:
        print(f"\nTTFT, 1,024-token prompt, {link['link']} (shaping: {link['shaping']}), median of {args.reps}; device and "
              "server one core each")
        print(f"{'cloud':<10}{'codec':<34}{'path':<9}{'TTFT':>9}{'bytes up':>14}")
        for r in link["rows"]:
            print(f"{r['cloud_dtype']:<10}{r['codec']:<34}{r['where']:<9}{r['ttft_ms']:>6.0f} ms{r['bytes_up']:>12.0f} B")
        for dtype in link["ratio"]:
            print(f"{dtype} cloud: codec / fp16 TTFT {link['ratio'][dtype]:.2f}x; the compute floor (codec, no link) / fp16 "
                  f"{link['floor_ratio'][dtype]:.2f}x")
    else:
        print(f"\nTTFT on the emulated link: skipped ({link['skipped']})")
    print("\nKV codec for moves: bench/kv_wire.py")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"split": SPLIT, "quality": q, "speed": s, "ttft": link}, indent=2) + "\n")


if __name__ == "__main__":
    main()

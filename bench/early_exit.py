"""Would an early-exit draft pay? How often the LM head on the hidden states at layer ℓ (final norm, tied LM head:
what a device holding the embedding could compute) picks the token the whole model picks, on SmolLM2.

    .venv/bin/python bench/early_exit.py [--json bench/results/early_exit.json]

Teacher-forced on 512 tokens of the protocol text and on bench/e2e.py's speculation prompts (fp32 model). A draft
token is kept only when it is the model's own choice, so this agreement bounds the tokens a one-token early-exit
draft could keep per round trip.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import e2e  # noqa: E402

from splitlm import corpus  # noqa: E402
from splitlm.model.load import build_stage  # noqa: E402
from splitlm.model.registry import resolve_model  # noqa: E402

LAYERS = (5, 10, 15, 20, 25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench/results/early_exit.json")
    args = ap.parse_args()
    ckpt = resolve_model("smollm2-135m")
    tok = ckpt.tokenizer()
    model = build_stage(ckpt).eval()
    texts = {"protocol text": corpus.windows(tok, corpus.protocol_text(), 1)[0]}
    texts.update({name: tok.encode(prompt).ids for name, prompt in e2e.SPECULATION_PROMPTS.items()})
    rows = []
    with torch.inference_mode():
        for name, ids in texts.items():
            h, rotary, mask = model.prepare(torch.tensor([ids]))
            picks = {}
            for i in range(ckpt.spec.num_layers):
                h, _ = model.run_layers(h, rotary, mask, lambda _: None, range(i, i + 1))
                if i + 1 in LAYERS or i + 1 == ckpt.spec.num_layers:
                    picks[i + 1] = model.lm_head(model.model.norm(h))[0].argmax(-1)
            final = picks.pop(ckpt.spec.num_layers)
            rows.append({"text": name, "tokens": len(ids),
                         "agreement": {str(layer): float((p == final).float().mean()) for layer, p in picks.items()}})
    print("SmolLM2: share of positions where the LM head at layer ℓ picks the model's token (teacher-forced, fp32)")
    print(f"{'text':<22}{'tokens':>7}" + "".join(f"{'ℓ ' + str(layer):>8}" for layer in LAYERS))
    for r in rows:
        print(f"{r['text']:<22}{r['tokens']:>7}" + "".join(f"{r['agreement'][str(layer)]:>8.2f}" for layer in LAYERS))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"layers": LAYERS, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

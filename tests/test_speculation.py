"""Speculation across the split (DESIGN.md §11): drafts verified by the cloud in one step give the output of decoding
one token at a time: greedy and seeded sampling, drafts always wrong, always right and mixed, in process and over
gRPC, and after a failover that replays verified frames."""

from __future__ import annotations

import pytest

from splitlm.draft import DraftLength, PromptLookup
from splitlm.errors import ConfigError
from splitlm.sampling import SamplingParams

SEEDED = SamplingParams(temperature=0.8, seed=5)
N = 40


class Oracle:
    """Drafts the reference output's next tokens (always right), or their successors + 1 (always wrong), or every
    other step one of each (mixed)."""

    def __init__(self, prompt: list[int], reference: list[int], mode: str) -> None:
        self.full, self.prompt, self.mode, self.calls = prompt + reference, len(prompt), mode, 0

    def propose(self, history: list[int], k: int) -> list[int]:
        self.calls += 1
        right = self.full[len(history):len(history) + k]
        if self.mode == "right" or (self.mode == "mixed" and self.calls % 2):
            return right
        return [(t + 1) % 97 for t in right]


@pytest.fixture(scope="module")
def export(tiny_ckpt, tmp_path_factory):
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, codec=CodecConfig("fp32"), prefill_chunk=8, max_seq_len=128)
    return plan, export_artifacts(tiny_ckpt, plan, tmp_path_factory.mktemp("spec"), progress=False)


def _prompt(ckpt):
    return ckpt.tokenizer().encode("a b c d a b c d a b c d a b").ids


def _run(export, prompt, sampling, speculate=False, drafter=None, n=N):
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession, generate_split

    _, result = export
    tail = TailRunner(result.cloud_dir).new_session(sampling)
    return generate_split(HeadSession(result.device_dir), tail, prompt, n, speculate=speculate, drafter=drafter)


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("mode", ["right", "wrong", "mixed", "lookup"])
def test_speculative_output_equals_one_token_at_a_time(export, tiny_ckpt, sampling, mode):
    prompt = _prompt(tiny_ckpt)
    plain = _run(export, prompt, sampling)
    drafter = PromptLookup() if mode == "lookup" else Oracle(prompt, plain.token_ids, mode)
    spec = _run(export, prompt, sampling, speculate=True, drafter=drafter)
    assert spec.token_ids == plain.token_ids
    assert spec.extra["drafted"] > 0
    if mode == "right":
        assert spec.extra["accepted"] == spec.extra["drafted"] and spec.extra["tokens_per_round_trip"] > 3
    if mode == "wrong":
        assert spec.extra["accepted"] == 0 and spec.extra["tokens_per_round_trip"] == 1


def test_prompt_lookup_drafts_what_followed_the_last_occurrence():
    d = PromptLookup()
    assert d.propose([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert d.propose([1, 2, 3, 9, 1, 2, 3, 9, 7], 2) == []  # (9, 7) and (7,) are new; (3, 9, 7) too
    assert d.propose([5, 6], 4) == []
    assert d.propose([5, 6], 0) == []


def test_the_draft_length_follows_acceptance():
    n = DraftLength(k=4, max_k=6)
    n.update(4, 4)
    assert n.k == 5
    n.update(5, 1)
    assert n.k == 2
    n.update(2, 0)
    assert n.k == 1
    with pytest.raises(ConfigError, match="1 <= k <= max_k"):
        DraftLength(k=0)


def test_a_send_function_cannot_speculate(export, tiny_ckpt):
    from splitlm.device.runtime import HeadSession, generate_split

    with pytest.raises(ConfigError, match="speculation needs a session that verifies drafts"):
        generate_split(HeadSession(export[1].device_dir), lambda frame, rows, want: 0, _prompt(tiny_ckpt), 4, speculate=True)

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

    def propose(self, history: list[int], k: int, min_match: int = 1) -> list[int]:
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
    assert PromptLookup().propose([1, 2, 3, 9, 4, 3], 2) == [9, 4]  # (3,) matches
    assert PromptLookup().propose([1, 2, 3, 9, 4, 3], 2, min_match=2) == []  # (4, 3) does not


def test_the_draft_length_follows_acceptance():
    n = DraftLength(k=4, max_k=6)
    n.update(4, 4)
    assert n.k == 5
    n.update(5, 1)
    assert n.k == 2
    n.update(2, 0)
    n.update(1, 0)
    assert n.k == 1 and n.min_match == 1
    n.update(1, 0)
    assert n.min_match == 2  # three misses in a row: drafts need a two-token match
    n.update(1, 1)
    assert n.min_match == 1 and n.k == 2
    with pytest.raises(ConfigError, match="1 <= k <= max_k"):
        DraftLength(k=0)


def test_a_send_function_cannot_speculate(export, tiny_ckpt):
    from splitlm.device.runtime import HeadSession, generate_split

    with pytest.raises(ConfigError, match="speculation needs a session that verifies drafts"):
        generate_split(HeadSession(export[1].device_dir), lambda frame, rows, want: 0, _prompt(tiny_ckpt), 4, speculate=True)


def _remote(address, export, prompt, sampling, drafter, kill=None):
    """A speculative generation over gRPC through a ReplayingSession: (result, replays). kill(session_id) runs after
    the third verified step (the serving replica dies then)."""
    from splitlm.device.client import FailoverConfig, ReplayingSession, connect
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = export
    with connect(address) as channel, ReplayingSession(channel, plan.hash, plan.model_id, sampling, N,
                                                       failover=FailoverConfig(deadline_s=20)) as remote:
        class Link:
            verified = 0

            def send(self, frame, rows, want_token):
                return remote.send(frame, rows, want_token)

            def verify(self, frame, rows, drafts):
                answer = remote.verify(frame, rows, drafts)
                self.verified += 1
                if kill is not None and self.verified == 3:
                    kill(remote.remote.info.session_id)
                return answer

        out = generate_split(HeadSession(result.device_dir), Link(), prompt, N, speculate=True, drafter=drafter)
    return out, remote.replays


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_speculation_over_grpc_and_after_a_failover_equals_one_token_at_a_time(export, tiny_ckpt, sampling):
    from tests.test_moves import _serve

    prompt = _prompt(tiny_ckpt)
    plain = _run(export, prompt, sampling)
    servers = [_serve(export) for _ in range(2)]
    try:
        out, replays = _remote(servers[0][1], export, prompt, sampling, Oracle(prompt, plain.token_ids, "mixed"))
        assert out.token_ids == plain.token_ids and not replays and out.extra["accepted"] > 0

        def kill(session_id):
            [s for s in servers if session_id in s[2].sessions][0][0].stop(grace=None)

        out, replays = _remote(",".join(s[1] for s in servers), export, prompt, sampling,
                               Oracle(prompt, plain.token_ids, "mixed"), kill=kill)
        assert out.token_ids == plain.token_ids and len(replays) == 1
    finally:
        for server, _, _ in servers:
            server.stop(grace=None)


def _logprobs_run(address, export, prompt, drafter=None):
    """A generation over gRPC asking 3 logprobs: (tokens, (logprob, top ids) of each generated token), with
    speculation when a drafter is given (the kept drafts' logprobs come in their step's Token.kept)."""
    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split

    plan, result = export
    got = []

    def note(lp):
        got.append((lp.logprob, [t.id for t in lp.top]))

    with connect(address) as channel, RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), N, logprobs=3) as remote:
        class Link:
            def send(self, frame, rows, want_token):
                token = remote.send(frame, rows, want_token)
                if want_token:
                    note(remote.last_token)
                return token

            def verify(self, frame, rows, drafts):
                answer = remote.verify(frame, rows, drafts)
                assert len(remote.last_token.kept) == answer[0]
                for kept in remote.last_token.kept:
                    note(kept)
                note(remote.last_token)
                return answer

        out = generate_split(HeadSession(result.device_dir), Link(), prompt, N, speculate=drafter is not None,
                             drafter=drafter)
    return out, got


def test_kept_drafts_carry_their_logprobs(export, tiny_ckpt):
    from tests.test_moves import _serve
    from tests.tolerances import TOL

    prompt = _prompt(tiny_ckpt)
    plain = _run(export, prompt, SamplingParams())
    server, address, _ = _serve(export)
    try:
        base, want = _logprobs_run(address, export, prompt)
        spec, got = _logprobs_run(address, export, prompt, Oracle(prompt, plain.token_ids, "mixed"))
    finally:
        server.stop(grace=None)
    assert spec.token_ids == base.token_ids == plain.token_ids and spec.extra["accepted"] > 0
    # one (logprob, top) per generated token but the last (generate_tokens stops at max_tokens before asking again)
    assert len(got) == len(want) == len(plain.token_ids)
    assert [ids for _, ids in got] == [ids for _, ids in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=TOL["wire_logprob_abs"])


def test_bad_verify_messages_are_refused_and_end_only_their_session(export, tiny_ckpt):
    """draft_ids without want_token, a frame whose rows are not drafts + 1, keep_rows past the frame: INVALID_ARGUMENT
    on that session, while another session on the same server runs on."""
    import grpc

    from splitlm.device.client import RemoteError, RemoteSession, connect
    from splitlm.device.runtime import DeviceHead, HeadSession
    from splitlm.proto import splitlm_pb2 as pb
    from tests.test_moves import _serve

    plan, result = export
    server, address, _ = _serve(export)
    prompt = _prompt(tiny_ckpt)
    try:
        with connect(address) as channel:
            healthy = RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), N)
            head = DeviceHead(HeadSession(result.device_dir))
            healthy.send(head.encode(head.step(prompt)), len(prompt))
            bad_cases = [
                (dict(want_token=False, draft_ids=[1, 2]), 3, "draft_ids is verified"),
                (dict(want_token=True, draft_ids=[1, 2]), 2, "2 rows with 2 draft_ids"),
                (dict(want_token=False, keep_rows=5), 3, "keep_rows 5 passes the frame's 3 rows"),
                (dict(want_token=True, keep_rows=1), 3, "keep_rows replays a verified frame"),
            ]
            for fields, rows, message in bad_cases:
                session = RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), N)
                other = DeviceHead(HeadSession(result.device_dir))
                frame = other.encode(other.step(prompt[:rows]))
                session._requests.put(pb.DeviceMessage(activations=pb.Activations(start_position=0, frame=frame, **fields)))
                with pytest.raises(RemoteError, match=message) as info:
                    session._receive("answer", 10, "test")
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT.name
            assert isinstance(healthy.send(head.encode(head.step([5])), 1), int)
            healthy.close()
    finally:
        server.stop(grace=None)


def test_generate_speculate_reports_tokens_per_round_trip(export, tmp_path, capsys):
    import json

    from splitlm.cli import main

    root = export[1].device_dir.parent
    outs = {}
    for flags in ([], ["--speculate"]):
        path = tmp_path / f"g{len(flags)}.json"
        assert main(["generate", "--artifacts", str(root), "--prompt", "a b c d a b c d a b c d a b c d a b",
                     "--max-tokens", "24", "--json", str(path), *flags]) == 0
        outs[bool(flags)] = json.loads(path.read_text())
    err = capsys.readouterr().err
    assert outs[True]["tokens"] == outs[False]["tokens"]
    assert outs[True]["tokens_per_round_trip"] >= 1 and outs[False]["tokens_per_round_trip"] == 1
    assert "tokens per round trip" in err


def test_device_only_exports_refuse_speculate(tiny_ckpt, tmp_path, capsys):
    from splitlm.cli import main
    from splitlm.export import export_artifacts
    from splitlm.partition.plan import Plan

    L = tiny_ckpt.spec.num_layers
    export_artifacts(tiny_ckpt, Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, L, max_seq_len=64), tmp_path / "art", progress=False)
    assert main(["generate", "--artifacts", str(tmp_path / "art"), "--prompt", "x", "--speculate"]) == 2
    assert "device-only" in capsys.readouterr().err


LOOKUP_TEXT = ("The city council met on Tuesday to discuss the new park. The park will have a playground, a pond and a walking "
               "trail. Construction will start in the spring and should finish by the end of the year.")


@pytest.fixture(scope="module")
def smollm_export(smollm_ckpt, tmp_path_factory):
    from splitlm.demo import default_plan
    from splitlm.export import export_artifacts

    return export_artifacts(smollm_ckpt, default_plan(smollm_ckpt), tmp_path_factory.mktemp("smol-spec"), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "dtype"), [(f"Rewrite this text, changing 'park' to 'garden':\n\n{LOOKUP_TEXT}", "float32"),
                                               ("Write a short poem about the sea.", "float32"),
                                               ("Give me three tips for learning Python.", "bfloat16")],
                         ids=["edit", "poem", "tips-bfloat16"])
def test_speculation_on_smollm2_equals_one_token_at_a_time(smollm_ckpt, smollm_export, prompt, dtype):
    """The default plan's export (8-bit head, int8 compute, the ans codec), 64 greedy tokens: drafts always
    wrong, always right, mixed, and prompt lookup all give the tokens of decoding one at a time. A bfloat16 tail
    gives a row the same logits alone as among others (lone rows run as two); without that, this prompt's tokens
    part at the fifth."""
    from splitlm.cloud.tail import TailRunner
    from splitlm.device.runtime import HeadSession, generate_split

    session, runner = HeadSession(smollm_export.device_dir), TailRunner(smollm_export.cloud_dir, dtype=dtype, device="cpu")
    assert runner.rows_alike or dtype == "float32"
    ids = smollm_ckpt.tokenizer().encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n").ids
    plain = generate_split(session, runner.new_session(), ids, 64).token_ids
    for mode in ("wrong", "right", "mixed", "lookup"):
        drafter = PromptLookup() if mode == "lookup" else Oracle(ids, plain, mode)
        spec = generate_split(session, runner.new_session(), ids, 64, speculate=True, drafter=drafter)
        assert spec.token_ids == plain, mode


class FixedDraft:
    """Drafts the same two tokens at every step: right sometimes, wrong other times."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, history, k, min_match=1):
        return self.tokens[:k]


def test_sampled_tokens_follow_the_same_distribution_with_and_without_speculation(export, tiny_ckpt):
    """The acceptance rule at work: 200 sampled runs with drafts (seeds 0..199) against 200 without (seeds
    1000..1199), temperature 1.5; the distribution of each of the first three generated tokens agrees within a
    chi-square bound (p > 0.001), and drafts were both kept and rejected."""
    import numpy as np

    prompt = _prompt(tiny_ckpt)[:6]
    first = _run(export, prompt, SamplingParams(temperature=1.5, seed=0), n=3).token_ids
    runs = 200
    kept = drafted = 0
    samples = {True: [], False: []}
    for spec in (True, False):
        for i in range(runs):
            sampling = SamplingParams(temperature=1.5, seed=i if spec else 1000 + i)
            out = _run(export, prompt, sampling, speculate=spec, drafter=FixedDraft(first[1:]), n=3)
            samples[spec].append(out.token_ids[:3])
            if spec:
                kept, drafted = kept + out.extra["accepted"], drafted + out.extra["drafted"]
    assert 0 < kept < drafted
    for pos in range(3):
        a = np.array([s[pos] for s in samples[True]])
        b = np.array([s[pos] for s in samples[False]])
        values = np.unique(np.concatenate([a, b]))
        table = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]], float)
        table = table[:, table.sum(0) >= 10]  # pool rare tokens out: the chi-square needs counts
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        chi2 = float(((table - expected) ** 2 / expected).sum())
        dof = table.shape[1] - 1
        # p > 0.001: chi2 below the 99.9 % quantile, by the Wilson-Hilferty approximation
        bound = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3 if dof else 0.0
        assert chi2 <= bound, (pos, chi2, bound, table)


def test_sessions_speculating_and_decoding_side_by_side_on_one_server(export, tiny_ckpt):
    """Three sessions on one server at once, two verifying drafts (right, mixed) and one decoding a token at a time:
    the batcher runs their steps in shared turns, and each gives its one-token-at-a-time output."""
    from concurrent.futures import ThreadPoolExecutor

    from splitlm.device.client import RemoteSession, connect
    from splitlm.device.runtime import HeadSession, generate_split
    from tests.test_moves import _serve

    plan, result = export
    prompt = _prompt(tiny_ckpt)
    plain = _run(export, prompt, SamplingParams()).token_ids
    server, address, service = _serve(export)
    try:
        def one(mode):
            with connect(address) as channel:
                remote = RemoteSession(channel, plan.hash, plan.model_id, SamplingParams(), N)
                out = generate_split(HeadSession(result.device_dir), remote, prompt, N, speculate=mode is not None,
                                     drafter=Oracle(prompt, plain, mode) if mode else None)
                remote.close()
                return out.token_ids

        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(one, ["right", None, "mixed"]))
        assert outs == [plain] * 3
    finally:
        server.stop(grace=None)

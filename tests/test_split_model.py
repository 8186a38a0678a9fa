"""The headline claims on the tiny model: split == unsplit, and cached decoding == one full forward."""

import pytest
import torch

from splitlm.local import LocalSplit
from splitlm.model.llama import KVCache
from splitlm.model.load import build_stage
from tests.tolerances import TOL

torch.manual_seed(0)


@pytest.fixture(scope="module")
def full(tiny_ckpt):
    return build_stage(tiny_ckpt)


@pytest.fixture(scope="module")
def ids(tiny_ckpt):
    return torch.randint(0, tiny_ckpt.spec.vocab_size, (2, 37))


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4])
def test_split_logits_equal_unsplit(tiny_ckpt, full, ids, split):
    with torch.inference_mode():
        ref = full(ids)
        got = LocalSplit(tiny_ckpt, split, prefill_chunk=64).forward(ids)
    assert (got - ref).abs().max() <= TOL["fp32_split"]


@pytest.mark.parametrize("split", [0, 2, 4])
def test_chunked_prefill_then_decode_equals_full_forward(tiny_ckpt, full, ids, split):
    runner = LocalSplit(tiny_ckpt, split, prefill_chunk=8)
    caches = runner.new_caches()
    with torch.inference_mode():
        ref = full(ids)
        parts = [runner.forward(ids[:, :20], caches)]  # 3 chunks: 8 + 8 + 4
        for t in range(20, ids.shape[1]):
            parts.append(runner.forward(ids[:, t:t + 1], caches))
    got = torch.cat(parts, dim=1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= TOL["fp32_split"]
    assert caches.head.length == ids.shape[1]
    assert caches.tail.length == (ids.shape[1] if split < tiny_ckpt.spec.num_layers else 0)


def test_stage_owns_only_its_layers(tiny_ckpt):
    head = build_stage(tiny_ckpt, 0, 1, final=False)
    names = head.state_dict_names()
    assert any(n.startswith("model.layers.0.") for n in names)
    assert not any(n.startswith(("model.layers.1.", "model.layers.3.", "lm_head", "model.norm")) for n in names)
    tail = build_stage(tiny_ckpt, 3, 4, embed=False)
    names = tail.state_dict_names()
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names


def test_tied_lm_head_in_tail_uses_embedding(tiny_ckpt, full):
    assert tiny_ckpt.spec.tie_word_embeddings
    tail = build_stage(tiny_ckpt, 2, 4, embed=False)
    assert torch.equal(tail.lm_head.weight, full.model.embed_tokens.weight)


def test_cache_crop_then_recompute(tiny_ckpt, full, ids):
    cache = KVCache()
    with torch.inference_mode():
        full(ids[:, :30], cache=cache)
        cache.crop(25)
        got = full(ids[:, 25:30], cache=cache)
        ref = full(ids[:, :30])[:, 25:30]
    assert (got - ref).abs().max() <= TOL["fp32_split"]


def test_bad_split_is_a_clear_error(tiny_ckpt):
    from splitlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"split layer 5 is outside \[0, 4\]"):
        LocalSplit(tiny_ckpt, 5)
    with pytest.raises(ConfigError, match="outside"):
        LocalSplit(tiny_ckpt, -1)


def test_generate_same_greedy_tokens_at_every_split(tiny_ckpt):
    prompt = tiny_ckpt.tokenizer().encode("hello split world").ids
    outs = {s: LocalSplit(tiny_ckpt, s, prefill_chunk=4).generate(prompt, 12).token_ids for s in (0, 2, 4)}
    assert outs[0] == outs[2] == outs[4]
    assert len(outs[0]) >= 1


def test_generate_stops_at_max_seq_len(tiny_ckpt):
    prompt = list(range(3, 13))
    res = LocalSplit(tiny_ckpt, 2, max_seq_len=14).generate(prompt, 50)
    assert res.stop_reason in ("max_seq_len", "eos")
    if res.stop_reason == "max_seq_len":
        assert len(prompt) + len(res.token_ids) == 14


def test_last_only_logits_are_the_last_row(tiny_ckpt, full, ids):
    """The cloud runs the LM head on a prompt's last position only: same logits as the full run's last row."""
    with torch.no_grad():
        want = full(ids)[:, -1:]
        got = full(ids, last_only=True)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL["fp32_split"]

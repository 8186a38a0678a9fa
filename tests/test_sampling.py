import numpy as np
import pytest

from splitlm.errors import ConfigError
from splitlm.sampling import Sampler, SamplingParams
from tests.tolerances import TOL

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0, 2.9], dtype=np.float32)


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(LOGITS) == 1


def test_seeded_sampling_is_reproducible():
    p = SamplingParams(temperature=1.0, seed=42)
    s1, s2 = Sampler(p), Sampler(p)
    draws = [s1(LOGITS) for _ in range(50)]
    assert draws == [s2(LOGITS) for _ in range(50)]
    assert len(set(draws)) > 1
    other = Sampler(SamplingParams(temperature=1.0, seed=43))
    assert [other(LOGITS) for _ in range(50)] != draws


def test_top_k_1_and_tiny_top_p_are_greedy():
    assert {Sampler(SamplingParams(temperature=2.0, top_k=1, seed=s))(LOGITS) for s in range(20)} == {1}
    assert {Sampler(SamplingParams(temperature=2.0, top_p=0.01, seed=s))(LOGITS) for s in range(20)} == {1}


def test_top_k_restricts_support():
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    assert {s(LOGITS) for _ in range(300)} == {1, 2, 5}


def test_frequencies_follow_softmax():
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    n = 20000
    counts = np.bincount([s(LOGITS) for _ in range(n)], minlength=len(LOGITS)) / n
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    assert np.abs(counts - probs).max() < TOL["sampling_frequency_abs"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_params(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)

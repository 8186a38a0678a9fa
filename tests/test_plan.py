import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitlm.errors import PlanError
from splitlm.partition.plan import Plan, Predictions
from splitlm.quantize.config import CODEC_BITS, GROUP_SIZES, KV_BITS, SOURCE_GROUP, WEIGHT_BITS, WEIGHT_METHODS, CodecConfig, WeightQuant

weights = st.one_of(
    st.builds(WeightQuant, bits=st.sampled_from(WEIGHT_BITS), group_size=st.sampled_from(GROUP_SIZES),
              method=st.sampled_from(sorted(set(WEIGHT_METHODS) - {"source"})), symmetric=st.booleans()),
    st.builds(WeightQuant, bits=st.sampled_from(WEIGHT_BITS), group_size=st.just(SOURCE_GROUP), method=st.just("source")))
codecs = st.one_of(
    st.builds(CodecConfig, kind=st.sampled_from(["fp32", "fp16"])),
    st.builds(CodecConfig, kind=st.just("tabq"), error_budget=st.floats(1e-6, 1.0), deadzone=st.floats(0.0, 0.49)),  # ans
    st.builds(
        CodecConfig, kind=st.just("tabq"), entropy=st.just("none"), ts_rule=st.sampled_from(["none", "std", "channels"]),
        ts_threshold=st.floats(0.5, 20), ts_channels=st.lists(st.integers(0, 4095), max_size=8).map(tuple),
        error_budget=st.floats(1e-6, 1.0), bit_widths=st.sets(st.sampled_from(CODEC_BITS), min_size=1).map(lambda s: tuple(sorted(s))),
        group_size=st.sampled_from([0, 32, 64, 128])))
plans = st.builds(
    Plan, model_id=st.text(min_size=1, max_size=20), weights_hash=st.text("0123456789abcdef", min_size=16, max_size=16),
    split_layer=st.integers(0, 80), device_weights=weights, cloud_weights=weights, kv_bits=st.sampled_from(KV_BITS),
    codec=codecs, max_seq_len=st.integers(1, 1 << 17), prefill_chunk=st.integers(1, 4096),
    predictions=st.builds(Predictions, token_latency_ms=st.none() | st.floats(0, 1e4)))


@given(plans)
def test_json_round_trip_keeps_plan_and_hash(plan):
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash == plan.hash


def test_hash_ignores_predictions_but_not_settings():
    plan = Plan("m", "0" * 16, 3)
    assert plan.replace(predictions=Predictions(token_latency_ms=12.0)).hash == plan.hash
    assert plan.replace(split_layer=4).hash != plan.hash
    assert plan.replace(device_weights=WeightQuant(bits=4)).hash != plan.hash


def test_hand_edited_plan_with_stale_hash_is_refused(tmp_path):
    plan = Plan("m", "0" * 16, 3)
    data = json.loads(plan.to_json())
    data["split_layer"] = 5
    with pytest.raises(PlanError, match="does not match its contents"):
        Plan.from_dict(data)
    del data["hash"]
    assert Plan.from_dict(data).split_layer == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(split_layer=-1), "split_layer"),
    (dict(kv_bits=2), r"kv_bits 2 not in \(16, 8, 4\)"),
    (dict(device_weights=dict(bits=5)), r"weight bits 5 not in"),
    (dict(cloud_weights=dict(group_size=48)), "group size 48"),
    (dict(cloud_weights=dict(method="magic")), "weight method 'magic'"),
    (dict(codec=dict(kind="zip")), "codec kind 'zip'"),
    (dict(codec=dict(bit_widths=[4, 2])), "ascending"),
    (dict(codec=dict(bit_widths=[7])), "subset"),
    (dict(codec=dict(error_budget=0)), "error budget"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(split_moves=[[100, 4], [50, 2]]), "split move at length 50"),
    (dict(split_moves=[[100, 9]]), r"layer 9 must be within \[1, 6\]"),
    (dict(split_moves=[[100, 0]]), r"layer 0 must be within \[1, 6\]"),
    (dict(split_moves=[[100, 4], [200, 4]]), "the split is already there"),
    (dict(split_moves=[[100, 6]]), "the split is already there"),
    (dict(split_moves=[[100]]), "expected a list of 2 items"),
    (dict(split_moves=[[5000, 2]]), "within max_seq_len"),
    (dict(speculate="yes"), "speculate must be true or false"),
    (dict(move_codec=dict(coder="zip")), "move codec 'zip' not in"),
])
def test_invalid_fields_are_named(kwargs, message):
    data = json.loads(Plan("m", "0" * 16, 6).to_json())
    data.pop("hash")
    for key, value in kwargs.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_unknown_field_and_version():
    data = json.loads(Plan("m", "0" * 16, 6).to_json())
    data.pop("hash")
    with pytest.raises(PlanError, match="unknown field|unexpected keyword"):
        Plan.from_dict({**data, "bogus": 1})
    with pytest.raises(PlanError, match="version 2"):
        Plan.from_dict({**data, "version": 2})
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")


def test_split_moves_go_shallower_and_back_and_say_what_the_cloud_holds(tmp_path):
    plan = Plan("m", "0" * 16, 6, split_moves=((100, 4), (300, 2), (900, 6)))
    assert plan.cloud_start == 2 and plan.move_cuts == [2, 4] and plan.splits() == [2, 4, 6]
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert Plan("m", "0" * 16, 6).cloud_start == 6 and Plan("m", "0" * 16, 6).move_cuts == []
    plan.check_model(8)
    with pytest.raises(PlanError, match="device-only plan .* cannot move its split"):
        plan.check_model(6)


def test_load_names_the_file_and_what_is_wrong(tmp_path):
    from splitlm.partition.profile import Profile

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 1, "model_id": "m", "weights_hash": "h", "num_layers": 4, "hidden_size": 8,
                                "device": {}, "cloud": {}, "memory": {}, "link": {}, "codecs": [], "quality": {}}))
    with pytest.raises(PlanError, match=r"p.json is a profile, not a plan; make a plan from it with `splitlm partition"):
        Plan.load(path)
    path.write_text("{garbage")
    with pytest.raises(PlanError, match=r"p.json is not a plan: not valid JSON"):
        Plan.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(PlanError, match=r"p.json is not a plan: its JSON is a list"):
        Plan.load(path)
    data = json.loads(Plan("m", "0" * 16, 6).to_json())
    data.pop("hash")
    path.write_text(json.dumps({**data, "max_seq_len": "long"}))
    with pytest.raises(PlanError, match=r"p.json: plan has a missing, unknown or malformed field"):
        Plan.load(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "model_id"}))
    with pytest.raises(PlanError, match=r"p.json: plan has a missing.*'model_id'"):
        Plan.load(path)
    path.write_text(json.dumps({**data, "codec": "tabq"}))
    with pytest.raises(PlanError, match=r"p.json: plan has a missing, unknown or malformed field"):
        Plan.load(path)
    Plan("m", "0" * 16, 6).save(path)
    with pytest.raises(Exception, match=r"p.json is a plan, not a profile"):
        Profile.load(path)


def test_check_model():
    plan = Plan("m", "abc", 31)
    with pytest.raises(PlanError, match=r"split layer 31 is outside \[0, 30\]"):
        plan.check_model(30)
    with pytest.raises(PlanError, match="weights"):
        Plan("m", "abc", 3).check_model(30, "def")
    Plan("m", "abc", 30).check_model(30, "abc")


def test_plan_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, splitlm.partition.plan, splitlm.sampling, splitlm.model.spec, splitlm.model.names; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_a_device_only_plan_cannot_speculate():
    with pytest.raises(PlanError, match="cannot speculate"):
        Plan("m", "0" * 16, 6, speculate=True).check_model(6)


def test_fields_added_within_the_version_keep_older_plans_hashes():
    """A plan made before move_codec and speculate existed (this hash is the landed version's) still loads: those
    fields count in the hash only when set."""
    from splitlm.quantize.config import MoveCodec

    old = Plan("m", "0" * 16, 6)
    assert old.hash == "a2b785ef2b0120f1"
    assert Plan.from_json(old.to_json()).hash == old.hash
    assert len({old.hash, old.replace(speculate=True).hash, old.replace(move_codec=MoveCodec("exact")).hash}) == 3

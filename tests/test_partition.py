"""The partitioner's cost models and search on synthetic profiles."""

import dataclasses

import pytest

from splitlm.errors import ConfigError
from splitlm.partition.profile import (
    CodecPoint,
    LinkProfile,
    MemoryProfile,
    Profile,
    QualityTable,
    SideProfile,
)
from splitlm.partition.search import SPECULATIVE_ROW_COST, Budgets, price, search, to_plan

MB = 2**20


def synthetic(L=12, link=LinkProfile(50.0, 20.0), **memory_overrides) -> Profile:
    device = SideProfile((256, 4096), {16: (2.0, 2.4), 8: (1.0, 1.3), 4: (0.6, 0.9)}, {16: 0.2, 8: 0.1, 4: 0.08},
                         embed_ms=0.05, head_ms={8: 3.0, 16: 6.0}, step_overhead_ms=0.5)
    cloud = SideProfile((256, 4096), {16: (0.1, 0.12), 8: (0.08, 0.1)}, {16: 0.005, 8: 0.004}, head_ms={16: 0.5},
                        step_overhead_ms=1.0)
    memory = dict(layer_bytes={16: 8 * MB, 8: 4 * MB, 4: 2 * MB}, embed_bytes=10 * MB, lm_head_bytes={8: 5 * MB, 16: 10 * MB},
                  kv_bytes_per_token_layer={16: 2048, 8: 1024, 4: 512}, runtime_bytes=20 * MB)
    memory.update(memory_overrides)
    codecs = (CodecPoint("fp16", 512, 0.01, 0.01, "fp16"), CodecPoint("tabq eps=0.03", 130, 0.1, 0.05, "tabq", 0.03))
    quality = QualityTable(10.0, {8: {0: 0.0, L: 0.01}, 4: {0: 0.0, L: 0.2}}, {8: {0: 0.01, L: 0.0}}, {8: 0.001, 4: 0.02},
                           {"fp16": 0.0, "tabq eps=0.03": 0.008})
    return Profile("m", "h", L, 256, device, cloud, MemoryProfile(**memory), link, codecs, quality)


def test_profile_json_round_trip(tmp_path):
    p = synthetic()
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p


def test_profile_load_names_the_file_and_the_missing_field(tmp_path):
    import json

    synthetic().save(tmp_path / "p.json")
    good = json.loads((tmp_path / "p.json").read_text())
    bad = tmp_path / "bad.json"
    for change, message in [
        (lambda d: d.pop("memory"), r"bad.json: profile has no field 'memory'"),
        (lambda d: d["memory"].pop("embed_bytes"), r"bad.json: profile field 'memory' has no 'embed_bytes'"),
        (lambda d: d["device"].update(decode_ms=5), r"bad.json: profile field 'device' is malformed"),
        (lambda d: d["codecs"].append({"name": "x"}), r"bad.json: profile field 'codecs' has no 'bytes_per_token'"),
        (lambda d: d["link"].update(mtu=1500), r"bad.json: profile field 'link' is malformed \(unknown field\(s\) \['mtu'\]"),
    ]:
        data = json.loads(json.dumps(good))
        change(data)
        bad.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=message):
            Profile.load(bad)
    bad.write_text("{")
    with pytest.raises(ConfigError, match=r"bad.json is not a profile: not valid JSON"):
        Profile.load(bad)
    bad.write_text("[]")
    with pytest.raises(ConfigError, match=r"bad.json is not a profile: its JSON is a list, not an object"):
        Profile.load(bad)


def test_profile_saves_what_it_measured_when_a_later_phase_stops_it(tmp_path, capsys, monkeypatch, tiny_ckpt):
    """Interrupted after its first phase, `splitlm profile` keeps that phase's measurements in OUT.partial."""
    import gc
    import json

    import splitlm.profiler.device as device
    from splitlm.cli import main

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(device, "measure_kv_head", stop)  # the phase after the embedding-only head
    out = tmp_path / "p.json"
    # an earlier test's stopped gRPC aio server can leave tasks whose destruction prints a traceback to stderr: let
    # them go now, before this command's stderr is read
    gc.collect()
    capsys.readouterr()
    assert main(["profile", "--model", "tiny-random", "--reps", "1", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"what they measured is in {out}.partial" in err and "Traceback" not in err
    assert not out.exists()
    partial = json.loads((tmp_path / "p.json.partial").read_text())
    assert partial["partial"] is True and partial["model_id"] == "tiny-random"
    assert partial["stopped_by"].startswith("KeyboardInterrupt")
    first = partial["phases"]["embedding-only head"]
    assert first["runtime_bytes"] > 0 and len(first["decode_ms"]) == 3 and all(t > 0 for t in first["decode_ms"])


def test_costs_add_up():
    p, b = synthetic(), Budgets(1e12, 1e6, prompt_tokens=100)
    c = price(p, 4, 8, 16, 16, p.codecs[0], 1024, b)
    assert c.memory_bytes == pytest.approx(4 * 4 * MB + 10 * MB + 20 * MB + 4 * 2048 * 1024)
    decode_dev = 0.5 + 0.05 + 4 * (1.0 + 0.3 * (1024 - 256) / 3840) + 0.01
    decode_cloud = 1.0 + 0.01 + 8 * (0.1 + 0.02 * (1024 - 256) / 3840) + 0.5
    assert c.token_latency_ms == pytest.approx(decode_dev + 20.0 + (512 + 16) * 8 / 50e3 + decode_cloud)
    assert c.bytes_per_token == 512
    full = price(p, 12, 8, 16, 16, p.codecs[0], 1024, b)
    assert full.bytes_per_token == 0 and full.memory_bytes > c.memory_bytes


def test_speculation_divides_the_link_and_cloud_share_and_the_plan_speculates():
    p = synthetic()
    plain = price(p, 4, 8, 16, 16, p.codecs[0], 1024, Budgets(1e12, 1e6))
    spec = price(p, 4, 8, 16, 16, p.codecs[0], 1024, Budgets(1e12, 1e6, tokens_per_round_trip=2.0))
    call, encode = 0.5 + 0.05 + 4 * (1.0 + 0.3 * (1024 - 256) / 3840), 0.01  # the head's call, the row's encode
    link_and_cloud = plain.token_latency_ms - call - encode
    # two tokens a round trip: one call of two rows (SPECULATIVE_ROW_COST a row more), two rows encoded
    assert spec.token_latency_ms == pytest.approx(encode + (call * (1 + SPECULATIVE_ROW_COST) + link_and_cloud) / 2)
    assert spec.ttft_ms == plain.ttft_ms
    b = Budgets(1e12, 1e6, max_seq_len=1024, tokens_per_round_trip=2.0)
    split = to_plan(spec, p, b)
    assert split.speculate
    assert not to_plan(price(p, 12, 8, 16, 16, p.codecs[0], 1024, b), p, b).speculate  # device-only: nothing to hide
    with pytest.raises(ConfigError, match="tokens per round trip must be >= 1"):
        Budgets(1e12, 1e6, tokens_per_round_trip=0.5)


def test_nothing_fits_names_the_binding_constraint():
    result = search(synthetic(), Budgets(device_memory_bytes=5 * MB, token_latency_ms=1000))
    assert result.chosen is None
    assert "device memory binds" in result.message and "MiB of device memory" in result.message
    result = search(synthetic(), Budgets(device_memory_bytes=1e12, token_latency_ms=0.5))
    assert result.chosen is None and "token latency binds" in result.message


def test_memory_bound_budget_picks_a_shallow_split():
    b = Budgets(device_memory_bytes=40 * MB, token_latency_ms=1000, max_seq_len=1024)
    result = search(synthetic(), b)
    assert result.chosen is not None and result.chosen.memory_bytes <= 40 * MB
    assert 0 <= result.chosen.split < 12
    assert all(c.memory_bytes <= 40 * MB for c in result.pareto)


def test_latency_bound_budget_is_respected_and_changes_the_choice():
    loose = search(synthetic(), Budgets(device_memory_bytes=1e12, token_latency_ms=1000, max_seq_len=1024))
    tight = search(synthetic(), Budgets(device_memory_bytes=1e12, token_latency_ms=20, max_seq_len=1024))
    # the loose budget's choice (cloud-only, about 23 ms) is over the tight budget, so the choice must change
    assert tight.chosen.token_latency_ms <= 20 < loose.chosen.token_latency_ms
    assert tight.chosen.split != loose.chosen.split
    assert all(c.token_latency_ms <= 20 for c in tight.pareto)


def test_device_only_wins_over_a_terrible_link():
    p = synthetic(link=LinkProfile(1.0, 500.0))
    result = search(p, Budgets(device_memory_bytes=1e12, token_latency_ms=100, max_seq_len=1024))
    assert result.chosen.split == 12 and "device-only beats every split" in result.message


def test_cloud_only_wins_on_a_tiny_device():
    result = search(synthetic(link=LinkProfile(1000.0, 1.0)), Budgets(device_memory_bytes=31 * MB, token_latency_ms=1000,
                                                                    max_seq_len=1024))
    assert result.chosen.split == 0 and "cloud-only beats every split" in result.message


def test_latency_objective_and_pareto_front():
    p = synthetic()
    result = search(p, Budgets(device_memory_bytes=1e12, token_latency_ms=1000, max_seq_len=1024, objective="latency"))
    assert result.chosen.token_latency_ms == min(c.token_latency_ms for c in result.pareto)
    for a in result.pareto:  # nobody on the front is dominated by another member
        for c in result.pareto:
            if c is not a:
                assert not (c.perplexity <= a.perplexity and c.token_latency_ms <= a.token_latency_ms
                            and c.bytes_per_token <= a.bytes_per_token
                            and (c.perplexity, c.token_latency_ms, c.bytes_per_token)
                            != (a.perplexity, a.token_latency_ms, a.bytes_per_token))


def test_longest_fitting_sequence_is_planned():
    result = search(synthetic(), Budgets(device_memory_bytes=80 * MB, token_latency_ms=1000))
    c = result.chosen
    assert c.memory_bytes <= 80 * MB
    bigger = price(synthetic(), c.split, c.device_bits, c.cloud_bits, c.kv_bits, c.codec, c.max_seq_len * 2,
                   Budgets(80 * MB, 1000))
    assert c.max_seq_len == 32768 or bigger.memory_bytes > 80 * MB


def test_thirty_layer_search_space_is_covered():
    result = search(synthetic(L=30), Budgets(device_memory_bytes=1e12, token_latency_ms=1000))
    # 31 splits x device bits x cloud bits x KV bits x codecs, each at its longest fitting length
    assert result.evaluated >= 29 * 3 * 2 * 3 * 2
    assert result.feasible > 0 and result.chosen is not None


def test_cli_partition_writes_a_plan_with_predictions(tmp_path, capsys):
    from splitlm.cli import main
    from splitlm.partition.plan import Plan

    synthetic().save(tmp_path / "p.json")
    code = main(["partition", "--profile", str(tmp_path / "p.json"), "--device-memory", "64MiB", "--token-latency", "40ms",
                 "--ttft", "2s", "--out", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert code == 0 and "chose" in out and "searched" in out
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.predictions.device_memory_bytes <= 64 * MB and plan.predictions.token_latency_ms <= 40
    code = main(["partition", "--profile", str(tmp_path / "p.json"), "--device-memory", "1MB", "--token-latency", "40ms",
                 "--out", str(tmp_path / "x.json")])
    assert code == 3 and "device memory binds" in capsys.readouterr().err
    assert main(["partition", "--profile", str(tmp_path / "p.json"), "--device-memory", "lots", "--token-latency", "1ms",
                 "--out", str(tmp_path / "y.json")]) == 2
    assert "--device-memory 'lots'" in capsys.readouterr().err


TINY_PROFILE = dict(bits=(16, 4), kv_bits=(16, 8), contexts=(32, 128), prefill=32, memory_positions=256, lm_head_bits=(8,),
                    reps=2, probe_layers=1)


def test_profile_then_partition_on_the_tiny_model(tmp_path, capsys, tiny_ckpt):
    from splitlm.cli import main
    from splitlm.partition.plan import Plan
    from splitlm.profiler import ProfileConfig, measure_profile

    config = ProfileConfig(**TINY_PROFILE)  # probe_layers=1: heads of 1 and 2 layers, memory fitted from two depths
    profile = measure_profile(tiny_ckpt, LinkProfile(100.0, 10.0), config, progress=False)
    profile.save(tmp_path / "p.json")
    profile = Profile.load(tmp_path / "p.json")
    assert profile.num_layers == tiny_ckpt.spec.num_layers and set(profile.device.decode_ms) == {16, 4}
    assert set(profile.memory.layer_bytes) == {16, 4} and set(profile.memory.kv_bytes_per_token_layer) == {16, 8}
    assert {c.name for c in profile.codecs} >= {"fp16", "tabq eps=0.035"}
    assert profile.link.rtt_ms == 10 and profile.quality.base_ppl > 1
    assert 10 * MB < profile.memory.runtime_bytes < 1024 * MB  # a real process was measured
    assert profile.memory.embed_bytes > 0 and set(profile.memory.lm_head_bytes) == {8}
    assert profile.memory.head_bytes is not None
    assert profile.memory.device_bytes(2, 16, 16, 256) >= profile.memory.device_bytes(0, 16, 16, 256) > 10 * MB
    # the service's costs come from a real server over loopback: a step costs something
    assert profile.cloud.step_overhead_ms + profile.cloud.head_ms[16] > 0
    assert all(v >= 0 for v in profile.device.prefill_fixed_ms.values())
    # a quantized KV cache was timed against a 16-bit one at every context
    assert set(profile.device.kv_decode_ms) == {8} and len(profile.device.kv_decode_ms[8]) == 2
    assert profile.device.kv_prefill_ms_per_token[8] >= 0
    assert 0.5 <= profile.device.alone_decode_scale <= 1.5
    assert main(["partition", "--profile", str(tmp_path / "p.json"), "--device-memory", "1GB", "--token-latency", "1s",
                 "--out", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "pareto.png")]) == 0
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.model_id == "tiny-random" and plan.predictions.token_latency_ms is not None
    assert plan.predictions.prompt_tokens == 128
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def halves(tiny_ckpt, tmp_path_factory):
    """The tiny model profiled in halves: the cloud's (which writes the kit), then the device's from the kit."""
    from splitlm.profiler import ProfileConfig, measure_cloud_half, measure_device_half

    kit = tmp_path_factory.mktemp("halves") / "kit"
    cloud = measure_cloud_half(tiny_ckpt, kit, ProfileConfig(**TINY_PROFILE), progress=False)
    phases = {}
    device = measure_device_half(kit, LinkProfile(30.0, 15.0), progress=False, on_phase=phases.__setitem__)
    return kit, device, cloud, phases


def test_a_profile_in_halves_merges_into_one(halves, tmp_path, capsys):
    """The cloud's half writes a kit with no cloud folders; the device's half measures from the kit alone;
    partition merges the halves given in either order."""
    from splitlm.cli import main
    from splitlm.partition.plan import Plan
    from splitlm.partition.profile import load_profiles, save_part

    kit, device, cloud, phases = halves
    assert not list(kit.glob("*/cloud")) and (kit / "kit.json").is_file()
    assert device.kit == cloud.kit and device.link.rtt_ms == 15
    assert set(device.device.decode_ms) == {16, 4} and set(device.memory.kv_bytes_per_token_layer) == {16, 8}
    assert device.memory.head_bytes is not None and 10 * MB < device.memory.runtime_bytes < 1024 * MB
    assert set(device.encode_ms) == {c.name for c in cloud.codecs} and all(e > 0 for e, _ in device.encode_ms.values())
    # the bar named each phase as it ran; the calibration and memory were reported
    assert {"embedding-only head", "device W4", "device calibration", "device memory", "link"} <= set(phases)
    save_part(device, tmp_path / "device.json")
    save_part(cloud, tmp_path / "cloud.json")
    profile = load_profiles([tmp_path / "cloud.json", tmp_path / "device.json"])
    assert profile.device == device.device and profile.cloud == cloud.cloud and profile.link == device.link
    assert [c.encode_ms for c in profile.codecs] == [device.encode_ms[c.name][0] for c in cloud.codecs]
    assert main(["partition", "--profile", str(tmp_path / "device.json"), str(tmp_path / "cloud.json"),
                 "--device-memory", "1GB", "--token-latency", "1s", "--out", str(tmp_path / "plan.json")]) == 0
    assert Plan.load(tmp_path / "plan.json").model_id == "tiny-random"
    capsys.readouterr()
    import splitlm  # the API takes the halves as objects or files

    for halves_given in ((device, cloud), (cloud, device), [tmp_path / "device.json", tmp_path / "cloud.json"]):
        assert splitlm.choose_plan(halves_given, 1e9, 1000.0).plan == Plan.load(tmp_path / "plan.json")


def test_profile_halves_that_do_not_belong_together_are_refused(halves, tmp_path):
    from splitlm.partition.profile import load_profiles, save_part
    from splitlm.profiler.kit import Kit

    kit, device, cloud, _ = halves
    save_part(device, tmp_path / "device.json")
    save_part(dataclasses.replace(cloud, kit="0" * 16), tmp_path / "other.json")
    with pytest.raises(ConfigError, match="measured on kit .* wrote kit 0000"):
        load_profiles([tmp_path / "device.json", tmp_path / "other.json"])
    with pytest.raises(ConfigError, match="a device profile .* and a cloud profile"):
        load_profiles([tmp_path / "device.json"])
    with pytest.raises(ConfigError, match="a device profile .* and a cloud profile"):
        load_profiles([tmp_path / "device.json", tmp_path / "device.json"])
    (tmp_path / "half-kit").mkdir()
    (tmp_path / "half-kit" / "kit.json").write_text((kit / "kit.json").read_text())
    with pytest.raises(ConfigError, match="incomplete: .*text.txt is missing"):
        Kit.load(tmp_path / "half-kit")
    with pytest.raises(ConfigError, match="not a calibration kit"):
        Kit.load(tmp_path)


def test_profile_cli_probes_the_link_rtt_of_a_server(tmp_path):
    """--server: the RTT comes from health checks against a running service, not the flag."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from splitlm.profiler import probe_rtt_ms

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert 0 < probe_rtt_ms(f"127.0.0.1:{port}", count=5) < 100
    finally:
        server.stop(0)

    with pytest.raises(ConfigError, match="cannot probe the link"):
        probe_rtt_ms("127.0.0.1:1", count=1)


def test_ttft_counts_each_prefill_chunk_and_the_fixed_costs():
    p = synthetic()
    p = Profile(p.model_id, p.weights_hash, p.num_layers, p.hidden_size,
                SideProfile(p.device.contexts, p.device.decode_ms, p.device.prefill_ms_per_token, embed_ms=0.05,
                            head_ms=p.device.head_ms, prefill_fixed_ms={8: 0.3}),
                SideProfile(p.cloud.contexts, p.cloud.decode_ms, p.cloud.prefill_ms_per_token, head_ms={16: 0.5},
                            prefill_fixed_ms={16: 0.2}, prefill_overhead_ms=4.0),
                p.memory, p.link, p.codecs, p.quality)
    fp16 = p.codecs[0]
    c = price(p, 4, 8, 16, 16, fp16, 1024, Budgets(1e12, 1e6, prompt_tokens=300, prefill_chunk=128))
    device = 3 * 0.05 + 4 * (3 * 0.3 + 300 * 0.1)  # three chunks (128, 128, 44)
    link = 20.0 + 300 * 512 * 8 / 50e3
    cloud = 4.0 + 300 * 0.01 + 8 * (0.2 + 300 * 0.005) + 0.5
    assert c.ttft_ms == pytest.approx(device + 300 * 0.01 + link + cloud)


def test_embedding_rows_touched_grow_with_the_sequence():
    p = synthetic(embed_bytes_per_token=1000.0)
    b = Budgets(1e12, 1e6)
    short, long = (price(p, 4, 8, 16, 16, p.codecs[0], seq, b) for seq in (256, 4096))
    assert long.memory_bytes - short.memory_bytes == pytest.approx((4096 - 256) * (1000 + 4 * 2048))


def test_ttft_uses_the_prefill_chunk_codec_cost():
    p = synthetic()
    b = Budgets(1e12, 1e6, prompt_tokens=100)
    slow = CodecPoint("tabq", 130, 2.0, 0.5, "tabq", 0.03)
    fast = CodecPoint("tabq", 130, 2.0, 0.5, "tabq", 0.03, prefill_encode_ms_per_token=0.1, prefill_decode_ms_per_token=0.05)
    a, c = price(p, 4, 8, 16, 16, slow, 1024, b), price(p, 4, 8, 16, 16, fast, 1024, b)
    assert a.token_latency_ms == c.token_latency_ms
    assert a.ttft_ms - c.ttft_ms == pytest.approx(100 * (2.0 - 0.1) + 100 * (0.5 - 0.05))


def test_a_quantized_kv_cache_costs_device_time_that_grows_with_the_context():
    p = synthetic()
    dev = p.device
    kv = dataclasses.replace(dev, kv_decode_ms={8: (0.1, 0.5)}, kv_prefill_ms_per_token={8: 0.01})
    q = dataclasses.replace(p, device=kv)
    b = Budgets(1e12, 1e6, prompt_tokens=100)
    for seq, per_layer in ((256, 0.1), (4096, 0.5)):
        base, slow = price(p, 4, 8, 16, 8, p.codecs[0], seq, b), price(q, 4, 8, 16, 8, p.codecs[0], seq, b)
        assert slow.token_latency_ms - base.token_latency_ms == pytest.approx(4 * per_layer)
        assert slow.ttft_ms - base.ttft_ms == pytest.approx(4 * 100 * 0.01)
    # a 16-bit cache and cloud-only plans pay nothing
    assert price(q, 4, 8, 16, 16, p.codecs[0], 4096, b) == price(p, 4, 8, 16, 16, p.codecs[0], 4096, b)
    assert q.device.kv_decode(16, 1000) == 0.0
    with pytest.raises(ConfigError, match="kv_decode_ms"):
        dataclasses.replace(p, device=dataclasses.replace(dev, kv_decode_ms={8: (0.1,)}))


def test_link_only_reprofiles_the_link_of_a_profile(tmp_path, capsys):
    """`profile --link-only P --server ADDR`: the model's costs are kept, the RTT is probed."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from splitlm.cli import main

    synthetic().save(tmp_path / "p.json")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["profile", "--link-only", str(tmp_path / "p.json"), "--server", f"127.0.0.1:{port}",
                     "--bandwidth", "200", "--out", str(tmp_path / "q.json")]) == 0
    finally:
        server.stop(0)
    q = Profile.load(tmp_path / "q.json")
    assert q.link.bandwidth_mbps == 200 and 0 < q.link.rtt_ms < 20  # loopback, not the profile's 20 ms
    assert dataclasses.replace(q, link=synthetic().link) == synthetic()
    assert main(["profile", "--link-only", str(tmp_path / "p.json"), "--rtt", "35ms", "--out", str(tmp_path / "r.json")]) == 0
    assert Profile.load(tmp_path / "r.json").link == LinkProfile(50.0, 35.0)
    assert main(["profile", "--link-only", str(tmp_path / "p.json"), "--out", str(tmp_path / "s.json")]) == 2
    assert main(["profile", "--link-only", str(tmp_path / "p.json"), "--bandwidth", "fast", "--out", str(tmp_path / "s.json")]) == 2
    assert "--bandwidth is a number" in capsys.readouterr().err


def test_quality_ties_within_the_tolerance_go_to_the_faster_plan():
    """8-bit cloud layers cost +0.2 % perplexity here, below the quality model's resolution, and
    are 3x faster: with the default tolerance they win; with none, the strictly best perplexity
    (16-bit everywhere) does."""
    p = synthetic(link=LinkProfile(50.0, 2.0))
    p = dataclasses.replace(p, cloud=dataclasses.replace(p.cloud, decode_ms={16: (3.0, 3.5), 8: (1.0, 1.2)}),
                            quality=dataclasses.replace(p.quality, cloud_delta={8: {0: 0.002, 12: 0.0}}))
    b = dict(device_memory_bytes=1e12, token_latency_ms=1000, max_seq_len=1024)
    tied = search(p, Budgets(**b)).chosen
    strict = search(p, Budgets(**b, quality_tolerance=0.0))
    assert strict.chosen.perplexity == min(c.perplexity for c in strict.candidates) == pytest.approx(10.0)
    assert tied.cloud_bits == 8 and tied.perplexity <= strict.chosen.perplexity * 1.005
    assert tied.token_latency_ms < strict.chosen.token_latency_ms and tied.perplexity > strict.chosen.perplexity
    # beyond the tolerance quality still rules: nothing faster than the tie is chosen at a worse perplexity
    assert all(c.perplexity > strict.chosen.perplexity * 1.005 for c in strict.candidates
               if c.token_latency_ms < tied.token_latency_ms)
    with pytest.raises(ConfigError, match="quality tolerance"):
        Budgets(**b, quality_tolerance=1.5)


def test_memory_fitted_from_two_depths_recovers_the_surface():
    from splitlm.profiler import fit_memory

    runtime, fixed, per_token, layer, kv = 80 * MB, -6 * MB, 300.0, 5 * MB, 3000.0

    def peak(depth, seq):
        return runtime + fixed + per_token * seq + depth * (layer + kv * seq)

    fit = fit_memory(4, 28, 129, 1025, [peak(4, 129), peak(4, 1025)], [peak(28, 129), peak(28, 1025)], runtime)
    assert fit == pytest.approx({"fixed": fixed, "per_token": per_token, "layer": layer, "kv": kv})
    p = synthetic(layer_bytes={8: layer}, kv_bytes_per_token_layer={16: kv}, runtime_bytes=runtime, embed_bytes=9 * MB,
                  head_bytes=fixed, head_bytes_per_token=per_token)
    assert p.memory.device_bytes(12, 8, 16, 700) == pytest.approx(peak(12, 700))
    # the embedding-only head is the floor of a head with layers; a cloud-only plan is that head
    assert p.memory.device_bytes(1, 8, 16, 129) == pytest.approx(runtime + 9 * MB)
    assert p.memory.device_bytes(0, 8, 16, 700) == pytest.approx(runtime + 9 * MB)
    assert price(p, 10, 8, 8, 16, p.codecs[0], 700, Budgets(1e12, 1e6)).memory_bytes == pytest.approx(peak(10, 700))


def test_device_only_steps_use_the_spinning_threads_scale():
    p = synthetic()
    fast = dataclasses.replace(p, device=dataclasses.replace(p.device, alone_decode_scale=0.5))
    b = Budgets(1e12, 1e6)
    alone, alone_fast = (price(q, 12, 8, 16, 16, q.codecs[0], 256, b) for q in (p, fast))
    assert alone.token_latency_ms - alone_fast.token_latency_ms == pytest.approx(0.5 * 12 * 1.0)
    split, split_fast = (price(q, 6, 8, 16, 16, q.codecs[0], 256, b) for q in (p, fast))
    assert split.token_latency_ms == split_fast.token_latency_ms  # split sessions do not spin


def test_quality_table_is_cached_across_profiles(tiny_ckpt, monkeypatch, caplog):
    from splitlm.profiler import quality

    wins = [list(range(3, 40)), list(range(50, 90))]
    first = quality.cached_quality(tiny_ckpt, wins, (16, 4), (16, 8), progress=False)
    path = quality.quality_cache_path(tiny_ckpt, wins, (16, 4), (16, 8))
    assert path.exists() and first.base_ppl > 1

    def no_measuring(*args):
        raise AssertionError("measured again although cached")

    with monkeypatch.context() as m:
        m.setattr(quality, "measure_quality", no_measuring)
        assert quality.cached_quality(tiny_ckpt, wins, (4, 16), (8, 16), progress=False) == first
    # other windows or precisions are another entry; a corrupt entry is measured again, with a warning
    assert quality.quality_cache_path(tiny_ckpt, wins[:1], (16, 4), (16, 8)) != path
    path.write_text('{"base_ppl": ')
    assert quality.cached_quality(tiny_ckpt, wins, (16, 4), (16, 8), progress=False) == first
    assert "unreadable" in caplog.text


def test_plans_stay_within_the_positions_the_model_was_trained_for():
    p = dataclasses.replace(synthetic(), max_position=1024)
    chosen = search(p, Budgets(device_memory_bytes=2**30, token_latency_ms=1000.0)).chosen
    assert chosen is not None and chosen.max_seq_len <= 1024
    assert search(synthetic(), Budgets(device_memory_bytes=2**30, token_latency_ms=1000.0)).chosen.max_seq_len > 1024
    with pytest.raises(ConfigError, match="max_seq_len 4096 is past the 1024 positions m was trained for"):
        search(p, Budgets(device_memory_bytes=2**30, token_latency_ms=1000.0, max_seq_len=4096))


def test_a_kv_bound_split_reaches_its_length_by_moving_shallower():
    from splitlm.partition.search import price_moving, to_plan

    p, budget = synthetic(), 100 * MB
    b = Budgets(device_memory_bytes=budget, token_latency_ms=1000, max_seq_len=8192)
    codec = p.codecs[0]
    still = price(p, 8, 4, 16, 16, codec, 8192, b)
    assert still.memory_bytes > budget  # 8 layers of K/V to 8,192 positions do not fit
    moving = price_moving(p, 8, 4, 16, 16, codec, 8192, b)
    assert moving is not None and moving.memory_bytes <= budget and moving.max_seq_len == 8192
    (at, layer), = moving.moves
    assert 0 < layer < 8 and b.prompt_tokens < at < 8192
    # the deepest layer whose K/V fits: one more would not
    assert p.memory.device_bytes(8, 4, 16, 8192, layer + 1) + p.memory.activation_bytes_per_token * 128 > budget
    # latency is the worse of the two splits' (the deeper one's at the move, the shallower one's at the end)
    assert moving.token_latency_ms >= price(p, layer, 4, 16, 16, codec, 8192, b).token_latency_ms
    plan = to_plan(moving, p, b)
    assert plan.split_moves == ((at, layer),) and plan.cloud_start == layer
    assert price_moving(p, 1, 4, 16, 16, codec, 8192, b) is None  # nothing shallower than one layer
    result = search(p, b)
    assert result.chosen is not None and all(c.memory_bytes <= budget for c in result.candidates)
    assert any(c.split == 8 and c.moves for c in result.candidates)


def test_partition_table_is_aligned_and_always_shows_the_chosen_plan(tmp_path, capsys):
    from splitlm.cli import main

    synthetic().save(tmp_path / "p.json")
    for top in ("1", "20"):
        assert main(["partition", "--profile", str(tmp_path / "p.json"), "--device-memory", "64MiB", "--token-latency", "40ms",
                     "--out", str(tmp_path / "plan.json"), "--top", top]) == 0
        lines = capsys.readouterr().out.splitlines()
        table = lines[:lines.index(next(line for line in lines if line.startswith("chose")))]
        assert len({len(line) for line in table}) == 1, table  # every row as wide as the header: columns line up
        assert sum(line.startswith("* ") for line in table) == 1


def test_the_plot_front_keeps_only_points_nothing_beats_on_both_axes():
    from types import SimpleNamespace as C

    from splitlm.partition.plot import front_2d

    points = [C(token_latency_ms=1, perplexity=20), C(token_latency_ms=2, perplexity=10), C(token_latency_ms=3, perplexity=15),
              C(token_latency_ms=4, perplexity=9)]
    assert [(c.token_latency_ms, c.perplexity) for c in front_2d(points)] == [(1, 20), (2, 10), (4, 9)]


def test_the_embedding_growth_stops_at_its_table():
    """Mapped pages of the embedding table come in with the rows a text touches (and readahead), up to the table."""
    mem = synthetic(embed_bytes_per_token=50_000, embed_table_bytes={16: 40 * MB, 8: 10 * MB, 4: 10 * MB}).memory
    assert mem.device_bytes(0, 16, 16, 100) == mem.runtime_bytes + mem.embed_bytes + 100 * 50_000
    assert mem.device_bytes(0, 16, 16, 100_000) == mem.runtime_bytes + mem.embed_bytes + 40 * MB
    quantized = mem.device_bytes(1, 8, 16, 100_000)
    assert quantized == mem.runtime_bytes + mem.embed_bytes + 10 * MB + mem.layer_bytes[8] + 100_000 * 2048
    old = synthetic(embed_bytes_per_token=50_000).memory  # a profile without the field: no cap
    assert old.device_bytes(0, 16, 16, 100_000) == old.runtime_bytes + old.embed_bytes + 100_000 * 50_000

"""Rate adaptation of prompt frames (device/uplink.py): the cloud's receipts of prefill frames, read ahead of its
compute; the meter's rate; the ε of each prompt frame on a link slower than the device, and on one that keeps up."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from splitlm.device import uplink as uplink_module
from splitlm.device.uplink import HEADROOM, SLOPE, PrefillBudget, UplinkMeter, adapts
from splitlm.errors import ConfigError, PlanError


def frames(meter: UplinkMeter, n: int, nbytes: int, handed: float, arrived: float, error: float = 0.01,
           rows: int = 8) -> None:
    """n consecutive frames coded at ε `error`, handed off every `handed` s and read by the cloud every `arrived` s."""
    for i in range(n):
        meter.sent(i * rows, rows, nbytes, error, at=100.0 + i * handed)
    for i in range(n):
        meter.received(i * rows, nbytes, int((5.0 + i * arrived) * 1e6))


def test_the_meter_takes_the_links_rate_when_frames_queue_on_it():
    meter = UplinkMeter()
    frames(meter, 5, 10_000, handed=0.01, arrived=0.1)  # 100 kB/s carried, 1 MB/s made
    assert meter.limited and meter.link_bound == 4 and meter.device_bound == 0
    assert meter.rate == pytest.approx(100_000)
    assert meter.made == pytest.approx((1e6, 0.01))


def test_frames_the_device_was_slower_to_make_only_bound_the_rate_from_below():
    meter = UplinkMeter()
    frames(meter, 4, 10_000, handed=0.1, arrived=0.1)
    assert not meter.limited and meter.device_bound == 3 and meter.rate == pytest.approx(100_000)
    meter.received(999, 10_000, 1)  # a receipt of no frame this meter timed (a replay): nothing changes
    assert meter.device_bound == 3


def test_receipts_of_frames_that_do_not_follow_each_other_are_not_paired():
    meter = UplinkMeter()
    meter.sent(0, 8, 1000, 0.01, at=0.0)
    meter.sent(100, 8, 1000, 0.01, at=0.001)  # a later prompt: decode steps went between
    meter.received(0, 1000, 0)
    meter.received(100, 1000, 5_000_000)
    assert meter.rate is None and meter.made is None
    meter.sent(200, 8, 1000, 0.01, at=0.002)
    meter.received(200, 999, 6_000_000)  # not the frame that was sent
    assert meter.rate is None


def test_a_rate_assumed_from_the_plans_link_profile_holds_until_receipts_measure_the_link():
    meter = UplinkMeter()
    meter.assume(5_000)
    budget = PrefillBudget(0.01, 0.05, meter)
    assert budget.next() == 0.01  # one hand-off: how fast the device makes bytes is not known yet
    meter.sent(0, 8, 1_000, 0.01, at=10.0)
    meter.sent(8, 8, 1_000, 0.01, at=10.01)  # 100 kB/s made against 5 kB/s assumed
    assert budget.next() == 0.05
    meter.assume(1e9)  # a measure (or an earlier assumption) is not replaced
    assert meter.rate == 5_000
    frames(meter, 4, 10_000, handed=0.1, arrived=0.1)  # receipts: the link keeps up at 100 kB/s
    assert meter.rate == pytest.approx(100_000) and not meter.limited


def test_a_new_stream_forgets_the_last_servers_clock_and_keeps_the_rate():
    """A session's next stream (a later prompt, or a rebuild on another replica) may meet a server whose monotonic
    clock is far from the last one's: its delays are measured against its own least."""
    meter = UplinkMeter()
    frames(meter, 4, 10_000, handed=0.1, arrived=0.1)
    rate = meter.rate
    meter.new_stream()
    for i in range(4):  # the next server's clock is 1,000 s ahead: no frame waits on the link
        meter.sent(i * 8, 8, 10_000, 0.01, at=200.0 + i * 0.1)
        meter.received(i * 8, 10_000, int((1_105.0 + i * 0.1) * 1e6))
    assert not meter.limited and meter.link_bound == 0 and meter.rate == pytest.approx(rate)


def test_the_budget_raises_epsilon_while_the_link_is_slower_and_keeps_it_within_the_ceiling():
    def budget_after(handed: float, arrived: float, error: float = 0.01, nbytes: int = 10_000) -> float:
        meter = UplinkMeter()
        budget = PrefillBudget(0.01, 0.05, meter)
        assert budget.next() == 0.01  # nothing measured yet
        frames(meter, 6, nbytes, handed, arrived, error)  # enough for a queue of 50 ms to build at 15 ms a frame
        return budget.next()

    # the link carries 0.77 of what the device makes: ε to make bytes at HEADROOM of it
    assert budget_after(0.05, 0.065) == pytest.approx(0.01 * (0.065 / 0.05 / HEADROOM) ** (1 / SLOPE))
    assert budget_after(0.01, 0.1) == 0.05  # a tenth: more than the ceiling can make up
    assert budget_after(0.1, 0.1, error=0.05) == pytest.approx(0.05)  # it keeps up with frames at the ceiling: no lower, no higher
    # it carried 1.25x what they made (the receipts of a run come closer than the hand-offs): back down
    assert budget_after(0.1, 0.08, error=0.05) == pytest.approx(0.05 * 0.8 ** (1 / SLOPE))
    assert budget_after(0.1, 0.01, error=0.02) == 0.01  # never below the base
    meter = UplinkMeter()
    frames(meter, 3, 10_000, 0.01, 0.1)
    assert PrefillBudget(0.01, 0.01, meter).next() == 0.01  # a ceiling at the codec's ε: no adaptation
    assert PrefillBudget(0.01, 0.05, None).next() == 0.01  # no meter (an in-process tail)
    with pytest.raises(ConfigError, match="at least the codec's error budget"):
        PrefillBudget(0.05, 0.01, meter)


def test_the_plan_carries_the_ceiling_and_refuses_one_it_cannot_use(tiny_ckpt):
    from splitlm.partition.plan import Plan
    from splitlm.quantize.config import CodecConfig

    plan = Plan(tiny_ckpt.model_id, tiny_ckpt.weights_hash, 2, codec=CodecConfig("tabq", error_budget=0.02))
    assert plan.prefill_error_ceiling == 0.05 and adapts(plan)
    assert plan.replace(prefill_max_error=0.1).hash != plan.hash
    assert Plan.from_json(plan.replace(prefill_max_error=0.1).to_json()).prefill_max_error == 0.1
    assert not adapts(plan.replace(prefill_max_error=0.02))
    assert not adapts(plan.replace(codec=CodecConfig("fp16")))
    with pytest.raises(PlanError, match="below the codec's error budget 0.02"):
        plan.replace(prefill_max_error=0.01)
    with pytest.raises(PlanError, match="codec 'fp16' sends raw values"):
        plan.replace(codec=CodecConfig("fp16"), prefill_max_error=0.1)
    for bad in (0, -1.0, 2.0, True, "0.1"):
        with pytest.raises(PlanError, match="prefill_max_error must be a codec error in"):
            plan.replace(prefill_max_error=bad)


def test_the_cloud_receipts_frames_as_it_reads_them_ahead_of_its_compute(artifacts, serve):
    """With the tail's one thread held, no frame can run: every prefill frame is still receipted (the server reads
    ahead), and the session finishes once the thread is free."""
    from splitlm.device.client import RemoteSession, connect
    from splitlm.model.llama import KVCache
    from splitlm.sampling import SamplingParams

    plan, result = artifacts
    address, service = serve()
    release = threading.Event()
    held = service.runner.batcher.call(KVCache(), lambda: release.wait(30))
    meter = UplinkMeter()
    try:
        with RemoteSession(connect(address), plan.hash, plan.model_id, SamplingParams(), 4, uplink=meter) as remote:
            frame = _frames(result, 4)
            for i, f in enumerate(frame):
                meter.sent(8 * i, 8, len(f), 0.01)
                remote.send(f, 8, want_token=False)
            deadline = time.monotonic() + 10
            while meter.device_bound + meter.link_bound < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert meter.device_bound + meter.link_bound == 3 and not held.done()  # receipted, none of them run
            release.set()
            assert remote.send(frame[0], 8) is not None  # the frames ran in order, and this one after them
    finally:
        release.set()


def _frames(result, n: int) -> list[bytes]:
    """n frames of 8 rows each, the device's own encoding of a prompt."""
    from splitlm.device.runtime import DeviceHead, HeadSession

    head = DeviceHead(HeadSession(result.device_dir))
    return [head.encode(hidden) for hidden, _ in head.chunks(list(range(1, 8 * n + 1)))]


class PacedRelay:
    """A TCP relay to `target` that carries the device's bytes at `rate` bytes per second (and the cloud's at once)."""

    def __init__(self, target: str, rate: float) -> None:
        host, port = target.rsplit(":", 1)
        self.target, self.rate = (host, int(port)), rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            self._start(self._pump, conn, up, self.rate)
            self._start(self._pump, up, conn, None)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        try:
            while data := src.recv(128 if rate else 65536):  # paced in small pieces, as a link carries packets
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_on_a_slow_uplink_the_prompt_frames_go_at_a_looser_error(artifacts, serve, monkeypatch):
    """The tiny model's frames on a 5 kB/s uplink: the device makes them far faster than the link carries them. The
    first prompt measures the link (its receipts come after the device has made most of its frames); the next
    prompt of the same client starts from that measure and goes at the plan's ceiling, in fewer bytes. Over the
    unshaped link every frame keeps the codec's ε."""
    from splitlm.device.client import ReplayingSession, connect
    from splitlm.device.runtime import HeadSession, generate_split
    from splitlm.sampling import SamplingParams

    plan, result = artifacts
    address, _ = serve()
    relay = PacedRelay(address, 5_000)
    prompt = list(range(3, 3 + 96))  # 12 frames of 8 rows
    meter = UplinkMeter()
    runs = []
    try:
        for target, uplink in ((relay.address, meter), (relay.address, meter), (address, True)):
            if target == address:  # loopback: a receipt late by 50 ms (the GIL, a loaded machine) is not a queue
                monkeypatch.setattr(uplink_module, "QUEUE_S", 0.5)
            with ReplayingSession(connect(target), plan.hash, plan.model_id, SamplingParams(), 4, uplink=uplink) as remote:
                runs.append(generate_split(HeadSession(result.device_dir), remote, prompt, 4))
    finally:
        relay.close()
    first, second, fast = (r.extra["uplink"] for r in runs)
    assert first["link_bound_samples"] >= 5 and 3_000 < first["bytes_per_s"] < 7_000
    assert second["prefill_errors"] == [0.05] * 12
    assert runs[1].link_bytes < 0.9 * runs[0].link_bytes
    assert fast["link_bound_samples"] == 0 and set(fast["prefill_errors"]) == {0.01}
    assert all(len(r.token_ids) == 4 for r in runs)


def test_a_meter_that_fails_ends_neither_the_session_nor_its_steps(artifacts, serve):
    from splitlm.device.client import RemoteSession, connect
    from splitlm.sampling import SamplingParams

    class Broken(UplinkMeter):
        def received(self, start, nbytes, server_us):
            raise ZeroDivisionError("a bug in the meter")

    plan, result = artifacts
    address, _ = serve()
    with RemoteSession(connect(address), plan.hash, plan.model_id, SamplingParams(), 4, uplink=Broken()) as remote:
        frame = _frames(result, 2)
        remote.send(frame[0], 8, want_token=False)
        assert remote.send(frame[1], 8) is not None
        assert remote.uplink is None  # measuring stopped; the session went on

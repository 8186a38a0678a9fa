"""Rate adaptation of prompt frames to the device's uplink (torch-free).

A prompt's hidden states leave the device chunk by chunk as the head computes them. When the uplink carries
bytes more slowly than the device makes them, the frames queue on the link and the first token waits for the
queue; a looser codec error ε for those frames sends fewer bytes. The device learns its uplink from what it sends
anyway:

* `UplinkMeter`: the session asks the cloud for a receipt of each prefill frame (Open.uplink_receipts). The cloud
  reads frames ahead of its compute and stamps each receipt with the time it read the frame. While frames wait on
  the link (a frame's receipt came later after its hand-off than the least such delay, by QUEUE_S; no clocks are
  compared), the link is busy the whole time, and the bytes receipted over the time since it became busy are its rate. While frames do
  not wait, the bytes of the run over its span only say that the link carries at least that much.
* `PrefillBudget`: the ε of the next prefill frame, the plan's codec point while the link keeps up, raised toward the
  plan's ceiling (`Plan.prefill_max_error`) by how much faster the device makes bytes than the link carries them.
  Bytes follow ε as ε^(−SLOPE) (bench/wire.py, SmolLM2 split 10: 254, 226 and 190 bytes per row at ε 0.02, 0.03
  and 0.05), so a link that carries a fraction f of what the device makes needs ε·f^(−1/SLOPE).

Decode rows keep the plan's ε: a decode step's frame is a few hundred bytes, and its latency is the round trip.

A prompt's first receipts come back only after its first frames have crossed the link, and by then a device faster
than its link has made most of the prompt's frames. So the meter starts from the link bandwidth the plan was
partitioned for (`Predictions.link_mbps`, the profile's), when the plan has one: from the prompt's third frame on
(two hand-offs say how fast the device makes bytes) the ε follows it, until receipts measure the link. And the
meter outlives the session where its owner keeps it (`api.Device` keeps one for all its sessions), so a client's
next prompt starts from what the last one measured.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from splitlm.errors import ConfigError

QUEUE_S = 0.05
"""Seconds a frame waited on the link beyond the least any frame waited (its receipt time less its hand-off time,
against the smallest such difference: the clocks' offset and the link's latency cancel): past this, the link is
the slower side. Less is taken for scheduling noise: on loopback a receipt came late by more than 5 ms now and then
(tests/test_uplink.py), and a queue that short delays the first token by no more than that."""
MIN_SPAN_S = 0.05
"""Rates are bytes over spans of receipts at least this long: a link that delivers in bursts (a TCP stall, then
several frames at once) gives single intervals far off its rate (bench/uplink.py: 200 Mbit/s on a 1 Mbit/s link)."""
SLOPE = 0.3
"""Bytes of an entropy-coded frame go as ε^(−SLOPE) (module docstring)."""
HEADROOM = 0.9
"""The share of the link's rate that prefill frames aim at: a link just saturated never drains what queued before."""


@dataclass(frozen=True)
class _Sent:
    rows: int
    nbytes: int
    at: float
    error: float


class UplinkMeter:
    """The uplink's rate as the cloud's receipts of prefill frames show it (module docstring). Thread-safe: frames
    are recorded by the sending thread, receipts by the thread that reads the cloud's messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[int, _Sent] = {}
        """Frames sent and not yet receipted, by start position."""
        self._last: tuple[int, float] | None = None
        """(end position, receipt time on the server) of the last receipt."""
        self.rate: float | None = None
        """Bytes per second the link carries, None before a sample."""
        self.link_bound = 0
        """Samples taken while the link was the slower side."""
        self.device_bound = 0
        """Samples taken while the device was (each a lower bound on the rate)."""
        self.limited = False
        """Whether the last sample found the link the slower side."""
        self.made: tuple[float, float] | None = None
        """(bytes per second, ε) of the last frame the device handed off, its bytes over the time since the one before
        it in a run of consecutive prefill frames: how fast the device makes bytes, at that ε. It outlives a session
        when the meter does (a client's next prompt starts from what the last one measured)."""
        self._previous: tuple[int, float] | None = None  # (end position, hand-off time) of the last frame sent
        self._least: float | None = None  # the smallest receipt time less hand-off time seen
        self._run: list = [0.0, 0]  # [first receipt's server time, bytes receipted since] of the current run of frames
        self._busy: list | None = None  # the same since the link became the slower side, while it is

    def assume(self, rate: float) -> None:
        """Start from `rate` bytes per second (a plan's link profile) until receipts measure the link: the link is
        taken for the slower side when the device makes bytes faster than that."""
        with self._lock:
            if self.rate is None and rate > 0:
                self.rate, self.limited = rate, True

    def new_stream(self) -> None:
        """A new stream (a session, or a rebuild on another replica) starts: forget what depends on the last one's
        positions and server clock; keep the rate and how fast the device makes bytes."""
        with self._lock:
            self._sent.clear()
            self._least = self._last = self._busy = self._previous = None
            self._run = [0.0, 0]

    def sent(self, start: int, rows: int, nbytes: int, error: float, at: float | None = None) -> None:
        """A prefill frame of `rows` positions from `start`, `nbytes` bytes coded at ε `error`, handed to the link now
        (or `at`)."""
        at = time.monotonic() if at is None else at
        with self._lock:
            if len(self._sent) > 4096:  # receipts that never came (a server that sends none): forget the oldest
                self._sent.pop(next(iter(self._sent)))
            self._sent[start] = _Sent(rows, nbytes, at, error)
            if self._previous is not None and self._previous[0] == start and at > self._previous[1]:
                self.made = (nbytes / (at - self._previous[1]), error)
            self._previous = (start + rows, at)

    def received(self, start: int, nbytes: int, server_us: int) -> None:
        """The cloud's receipt of the frame from `start` (Received)."""
        with self._lock:
            frame = self._sent.pop(start, None)
            if frame is None or frame.nbytes != nbytes:  # not a frame this meter timed (a replay), or not the one sent
                return
            server_s = server_us / 1e6
            delay = server_s - frame.at  # the link's latency and queue, plus the clocks' offset
            self._least = delay if self._least is None else min(self._least, delay)
            last, self._last = self._last, (start + frame.rows, server_s)
            if last is None or last[0] != start:  # the first frame of a run: the spans start at its receipt
                self._run, self._busy = [server_s, 0], None
                return
            self._run[1] += nbytes
            self.limited = delay - self._least > QUEUE_S
            if self.limited:  # the frame waited on the link: it was busy since the receipt before
                self.link_bound += 1
                if self._busy is None:
                    self._busy = [last[1], 0]
                self._busy[1] += nbytes
                if server_s - self._busy[0] >= MIN_SPAN_S:
                    self.rate = self._busy[1] / (server_s - self._busy[0])
            else:
                self.device_bound += 1
                self._busy = None
                span = server_s - self._run[0]
                if span >= MIN_SPAN_S and (self.rate is None or self._run[1] / span > self.rate):
                    self.rate = self._run[1] / span


class PrefillBudget:
    """The codec error ε of each prefill frame (module docstring): `base`, the plan's codec point, while the uplink
    keeps up; up to `ceiling` when it does not."""

    def __init__(self, base: float, ceiling: float, meter: UplinkMeter | None) -> None:
        if not base > 0 or ceiling < base:
            raise ConfigError(f"the prefill error ceiling {ceiling} must be at least the codec's error budget {base} (> 0)")
        self.base, self.ceiling, self.meter = base, ceiling, meter
        self.used: list[float] = []
        """The ε of every prefill frame so far, in order."""

    def next(self) -> float:
        """The ε for the next prefill frame: while the link is the slower side, the ε at which the device would make
        bytes at HEADROOM of the link's rate; while it keeps up, the same toward the rate it has carried at least,
        never above the last measured frame's."""
        eps = self.base
        meter = self.meter
        if meter is None or self.ceiling <= self.base:
            self.used.append(eps)
            return eps
        with meter._lock:  # one sample's rate, rate and state together
            rate, made, limited = meter.rate, meter.made, meter.limited
        if rate and made:
            made, error = made
            if limited:
                eps = error * (made / (HEADROOM * rate)) ** (1.0 / SLOPE)
            else:
                eps = min(error, error * (made / rate) ** (1.0 / SLOPE))
            eps = min(self.ceiling, max(self.base, eps))
        self.used.append(eps)
        return eps

    def sent(self, start: int, rows: int, nbytes: int, error: float) -> None:
        """A prefill frame went to the link (UplinkMeter.sent), when there is a meter."""
        if self.meter is not None:
            self.meter.sent(start, rows, nbytes, error)


def adapts(plan) -> bool:
    """Whether a plan's prefill frames follow the uplink: a tabq codec and a ceiling above its ε."""
    ceiling = plan.prefill_error_ceiling
    return ceiling is not None and ceiling > plan.codec.error_budget

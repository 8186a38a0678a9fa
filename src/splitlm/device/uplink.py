"""Rate adaptation of prompt frames to the device's uplink (torch-free).

A prompt's hidden states leave the device chunk by chunk as the head computes them. When the uplink carries
bytes more slowly than the device makes them, the frames queue on the link and the first token waits for the
queue; a looser codec error ε for those frames sends fewer bytes. The device learns its uplink from what it sends
anyway:

* `UplinkMeter`: the session asks the cloud for a receipt of each prefill frame (Open.uplink_receipts). The cloud
  reads frames ahead of its compute and stamps each receipt with the time it read the frame, so the times between
  the receipts of consecutive frames are the times the link took to bring them whenever the link was busy the whole
  time: the receipts are further apart than the device's hand-offs (by `LINK_BOUND`) while frames wait on the link
  (`QUEUE_S`, measured without comparing clocks). Such a sample is the link's rate.
  A sample where the device was the slower side (receipts as far apart as the hand-offs) only says that the link
  carries at least that much.
* `PrefillBudget`: the ε of the next prefill frame, the plan's codec point while the link keeps up, raised toward the
  plan's ceiling (`Plan.prefill_max_error`) by how much faster the device makes bytes than the link carries them.
  Bytes follow ε as ε^(−SLOPE) (bench/wire.py, SmolLM2 split 10: 254, 226 and 190 bytes per row at ε 0.02, 0.03
  and 0.05), so a link that carries a fraction f of what the device makes needs ε·f^(−1/SLOPE).

Decode rows keep the plan's ε: a decode step's frame is a few hundred bytes, and its latency is the round trip.

What it cannot do: a prompt's first receipts come back only after its first frames have crossed the link, and by
then a device faster than its link has made most of the prompt's frames at the plan's ε. The meter outlives the
session where its owner keeps it (`api.Client` keeps one for all its sessions), so a client's next prompt starts
from what the last one measured.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from splitlm.errors import ConfigError

LINK_BOUND = 1.2
"""Receipts this much further apart than the device's hand-offs of the same frames, with a queue of QUEUE_S at least
on the link: the link was the slower side."""
QUEUE_S = 0.05
"""Seconds a frame waited on the link beyond the least any frame waited (its receipt time less its hand-off time,
against the smallest such difference: the clocks' offset and the link's latency cancel). Less is taken for
scheduling noise: on loopback a receipt came late by more than 5 ms now and then (tests/test_uplink.py), and a
queue that short delays the first token by no more than that."""
SMOOTHING = 0.5
"""Weight of a new link-bound sample in the rate estimate (an exponential average)."""
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
        self._last: tuple[int, float, float] | None = None
        """(end position, receipt time on the server, hand-off time on the device) of the last receipt."""
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
            last, self._last = self._last, (start + frame.rows, server_s, frame.at)
            if last is None or last[0] != start:  # the first frame of a run: nothing to measure it against
                return
            arrived, handed = server_s - last[1], frame.at - last[2]
            if arrived <= 0:
                return
            sample = nbytes / arrived
            self.limited = arrived > LINK_BOUND * handed and delay - self._least > QUEUE_S
            if self.limited:
                self.link_bound += 1
                self.rate = sample if self.rate is None else (1 - SMOOTHING) * self.rate + SMOOTHING * sample
            else:
                self.device_bound += 1
                if self.rate is None or sample > self.rate:
                    self.rate = sample


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
        if meter is not None and self.ceiling > self.base and meter.rate and meter.made:
            made, error = meter.made
            if meter.limited:
                eps = error * (made / (HEADROOM * meter.rate)) ** (1.0 / SLOPE)
            else:
                eps = min(error, error * (made / meter.rate) ** (1.0 / SLOPE))
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

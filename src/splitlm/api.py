"""The Python API: a few names for what the `splitlm` command does.

    import splitlm

    server = splitlm.serve("art")                              # the cloud part (the cloud install)
    with splitlm.Device("art", server=f"127.0.0.1:{server.port}") as device:
        for piece in device.stream("The capital of France is", max_tokens=16):
            print(piece, end="", flush=True)
        print(device.chat([{"role": "user", "content": "Hi!"}], max_tokens=32).text)
    server.stop()

`Device` is the device side and needs only the device install (no torch), as do `profile_device` (the
device's half of a two-machine profile) and `choose_plan`. `serve`, `export_plan` and `profile` need the
full one (each says so when it is missing).
(Not `export` and `partition`: those names are splitlm's subpackages.)
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from splitlm.errors import ConfigError
from splitlm.generation import GenerationResult
from splitlm.sampling import SamplingParams

_CLOUD_INSTALL = "pip install 'splitlm[cloud]'"


def _needs_cloud(what: str):
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{what} needs torch, which the device install leaves out: {_CLOUD_INSTALL}")


class Device:
    """The device side of an export: its head in onnxruntime and a cloud to send activations to.

    server: "HOST:PORT", or several separated by commas (replicas: sessions are spread by gRPC's
    round_robin and fail over by replay); None runs the exported tail in this process (full install).
    A device-only export needs no server. One generation runs at a time (others wait their turn).
    """

    def __init__(self, artifacts: str | os.PathLike, server: str | None = None, *, token: str | None = None,
                 tls_ca: str | os.PathLike | None = None, threads: int | None = None, failover_deadline_s: float = 60.0) -> None:
        from splitlm.artifacts import export_side
        from splitlm.device.runtime import HeadSession, load_tokenizer
        from splitlm.model.chat import load_template

        self.session = HeadSession(export_side(artifacts, "device"), threads=threads)
        self.tokenizer = load_tokenizer(self.session.dir)
        self.template = load_template(self.session.dir)
        self._lock = threading.Lock()
        self._channel = self._tail = None
        self._token, self._failover_deadline_s = token, failover_deadline_s
        self._uplink = None  # the UplinkMeter every session of this client shares (rate adaptation), made when one adapts
        if self.session.device_only:
            if server:
                raise ConfigError(f"{artifacts} is a device-only export: there is no cloud part to run on a server")
        elif server:
            from splitlm.device.client import connect

            self._channel = connect(server, tls_ca)
        else:
            _needs_cloud("running the cloud part in this process (no server given)")
            from splitlm.cloud.tail import TailRunner

            self._tail = TailRunner(export_side(artifacts, "cloud"))

    @property
    def plan(self):
        """The export's Plan."""
        return self.session.plan

    @property
    def model_id(self) -> str:
        return self.session.plan.model_id

    def prompt_ids(self, prompt: str | Sequence[Mapping[str, str]], chat: bool = False) -> list[int]:
        """Token ids of a prompt: text as it is, or (chat, or a list of messages) in the model's chat template."""
        from splitlm.model.chat import chat_prompt

        spec = self.session.spec
        if chat or not isinstance(prompt, str):
            prompt = chat_prompt(prompt, self.tokenizer, self.template, spec.bos_token_id,
                                 spec.eos_token_ids[0] if spec.eos_token_ids else None)
        return self.tokenizer.encode(prompt).ids

    def generate(self, prompt: str | Sequence[Mapping[str, str]], max_tokens: int = 256, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate up to max_tokens after `prompt` (text, or a list of {"role", "content"} messages for a chat).
        temperature 0 is greedy. `stop`: strings that end the generation (left out of the text). `on_text`
        gets each piece of text as it is decoded. The result's stop_reason is 'eos', 'max_tokens',
        'max_seq_len' or 'stop'."""
        from splitlm.model.tokenizer import StreamingDecoder

        sampling = SamplingParams(temperature, top_k, top_p, seed)
        ids = self.prompt_ids(prompt, chat)
        decoder, text, cut = StreamingDecoder(self.tokenizer), [""], [None]
        stops = [s for s in stop if s]

        def on_token(token: int) -> bool:
            if token in self.session.spec.eos_token_ids:
                return False
            piece = decoder.push(token)
            before = len(text[0])
            text[0] += piece
            for s in stops:
                at = text[0].find(s, max(0, before - len(s) + 1))
                if at >= 0:
                    cut[0] = at if cut[0] is None else min(cut[0], at)
            if cut[0] is not None:
                if on_text is not None and cut[0] > before:
                    on_text(text[0][before:cut[0]])
                return True
            if on_text is not None and piece:
                on_text(piece)
            return False

        with self._lock:
            result = self._run(ids, max_tokens, sampling, on_token)
        if cut[0] is not None:
            result.text = text[0][:cut[0]]
        return result

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 256, **kw: Any) -> GenerationResult:
        """`generate` on a list of {"role": "system" | "user" | "assistant", "content": ...} messages."""
        return self.generate(list(messages), max_tokens, **kw)

    def stream(self, prompt: str | Sequence[Mapping[str, str]], max_tokens: int = 256, **kw: Any) -> "TextStream":
        """`generate`, as an iterator of text pieces as they are decoded (a TextStream: its `result` once
        exhausted; `close()` ends the generation). Errors come out of the iterator."""
        return TextStream(lambda on_text: self.generate(prompt, max_tokens, on_text=on_text, **kw))

    def _run(self, ids: list[int], max_tokens: int, sampling: SamplingParams, on_token) -> GenerationResult:
        from splitlm.device.runtime import generate_device_only, generate_split

        session, tok = self.session, self.tokenizer
        if session.device_only:
            return generate_device_only(session, ids, max_tokens, sampling, on_token, tok)
        if self._tail is not None:
            return generate_split(session, self._tail.new_session(sampling), ids, max_tokens, on_token, tok,
                                  speculate=session.plan.speculate)
        from splitlm.device.client import FailoverConfig, ReplayingSession
        from splitlm.device.uplink import UplinkMeter, adapts

        if adapts(session.plan) and self._uplink is None:
            self._uplink = UplinkMeter()
        with ReplayingSession(self._channel, session.plan.hash, session.plan.model_id, sampling, max_tokens, self._token,
                              failover=FailoverConfig(deadline_s=self._failover_deadline_s),
                              uplink=adapts(session.plan) and self._uplink) as remote:
            result = generate_split(session, remote, ids, max_tokens, on_token, tok, speculate=session.plan.speculate)
        result.extra.update(bytes_up=remote.bytes_up, bytes_down=remote.bytes_down, replays=len(remote.replays))
        return result

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamClosed(Exception):
    """Raised inside a generation whose TextStream was closed: it ends at its next piece of text."""


class TextStream:
    """The text pieces of a generation that runs on a thread of its own, as an iterator. `result` holds the
    GenerationResult once the iterator is exhausted; an error of the generation is raised by the iterator;
    `close()` ends the generation at its next piece (the device is free again for the next one)."""

    _END = object()

    def __init__(self, generate: Callable[[Callable[[str], None]], GenerationResult]) -> None:
        self.result: GenerationResult | None = None
        self._pieces: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(generate,), name="splitlm-stream", daemon=True).start()

    def _on_text(self, piece: str) -> None:
        if self._closed.is_set():
            raise StreamClosed()
        self._pieces.put(piece)

    def _run(self, generate) -> None:
        try:
            self.result = generate(self._on_text)
        except BaseException as exc:  # noqa: BLE001 - raised by the iterator, on the caller's thread
            self._error = exc
        self._pieces.put(self._END)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        item = self._pieces.get()
        if item is self._END:
            self._pieces.put(item)  # exhausted for good
            if self._error is not None and not isinstance(self._error, StreamClosed):
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        self._closed.set()


def serve(artifacts: str | os.PathLike, address: str = "127.0.0.1:0", dtype: str = "float32", **config: Any):
    """Serve the cloud part of an export (full install): a running Server with `.port`, `.stop()` and
    `.wait_for_termination()`. `dtype`: what the tail computes in, as `splitlm serve --dtype`. `config`:
    ServerConfig fields (max_sessions, auth_token, max_kv_bytes, ...)."""
    _needs_cloud("serve")
    from splitlm.artifacts import export_side
    from splitlm.cloud.service import ServerConfig, start_server
    from splitlm.cloud.tail import TailRunner

    server, _, _ = start_server(TailRunner(export_side(artifacts, "cloud"), dtype=dtype), address, ServerConfig(**config))
    return server


def export_plan(model: str | os.PathLike, plan, out: str | os.PathLike, progress: bool = False):
    """Export `plan` (a Plan, or the path of a plan JSON file) of `model` (a known name, a GGUF file or a
    model folder) into `out`/device and `out`/cloud (full install): the ExportResult."""
    _needs_cloud("export")
    from splitlm.export import export_artifacts
    from splitlm.model.registry import resolve_model
    from splitlm.partition.plan import Plan

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    return export_artifacts(resolve_model(model, progress=progress), plan, Path(out), progress=progress)


def profile(model: str | os.PathLike = "smollm2-135m", *, bandwidth_mbps: float = 50.0, rtt_ms: float = 20.0,
            server: str | None = None, progress: bool = False):
    """Measure the device, the cloud and the link for `model` on this machine (full install; minutes): a Profile."""
    _needs_cloud("profile")
    from splitlm.model.registry import resolve_model
    from splitlm.partition.profile import LinkProfile
    from splitlm.profiler import ProfileConfig, measure_profile, probe_rtt_ms

    if server:
        rtt_ms = probe_rtt_ms(server)
    return measure_profile(resolve_model(model, progress=progress), LinkProfile(bandwidth_mbps, rtt_ms), ProfileConfig(),
                           progress=progress)


def profile_device(kit: str | os.PathLike, *, server: str | None = None, bandwidth_mbps: float = 50.0, rtt_ms: float = 20.0,
                   threads: int | None = None, progress: bool = False):
    """The device's half of a two-machine profile (the device install is enough), measured on the calibration
    kit that `splitlm profile --kit` wrote where the cloud runs; the link's RTT probed against `server` where
    one is given: a DeviceProfile. `choose_plan((device_half, cloud_half), ...)` merges it with the cloud's."""
    from splitlm.partition.profile import LinkProfile
    from splitlm.profiler import measure_device_half

    return measure_device_half(Path(kit), LinkProfile(bandwidth_mbps, rtt_ms), threads=threads, server=server, progress=progress)


def choose_plan(profile, device_memory_bytes: float, token_latency_ms: float, **budgets: Any):
    """The plan for a profile under these budgets (torch-free): the search's SearchResult, whose `plan` is the
    chosen Plan (None when nothing fits; `message` says why). `profile`: a Profile, the path of a profile JSON
    file, or a device half and a cloud half (objects or paths) to merge. `budgets`: other Budgets fields
    (ttft_ms, max_seq_len, objective, ...)."""
    from splitlm.partition.profile import CloudProfile, DeviceProfile, Profile, load_profiles, merge
    from splitlm.partition.search import Budgets, search, to_plan

    if isinstance(profile, (tuple, list)) and all(isinstance(p, (DeviceProfile, CloudProfile)) for p in profile):
        halves = {type(p): p for p in profile}
        if len(profile) != 2 or len(halves) != 2:
            raise ConfigError("give a device half and a cloud half to merge")
        profile = merge(halves[DeviceProfile], halves[CloudProfile])
    elif not isinstance(profile, Profile):
        profile = load_profiles(list(profile) if isinstance(profile, (tuple, list)) else [profile])
    b = Budgets(device_memory_bytes, token_latency_ms, **budgets)
    result = search(profile, b)
    result.plan = to_plan(result.chosen, profile, b) if result.chosen is not None else None
    return result

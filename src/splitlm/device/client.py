"""The device's side of the gRPC stream (torch-free): open a session, send frames, get tokens."""

from __future__ import annotations

import queue
from typing import Iterator

import grpc

from splitlm.errors import RemoteError, TransportError
from splitlm.proto import splitlm_pb2 as pb
from splitlm.proto import splitlm_pb2_grpc as pb_grpc
from splitlm.quantize.codec import parse_frame
from splitlm.sampling import SamplingParams

_CLOSE = object()


class RemoteSession:
    """One generation session on the cloud."""

    def __init__(self, channel: grpc.Channel, plan_hash: str, model_id: str, sampling: SamplingParams,
                 max_tokens: int, token: str | None = None, resume_session: str = "") -> None:
        self._requests: queue.Queue = queue.Queue()
        self.position = 0
        self.bytes_down = 0
        """Protobuf bytes received (messages, without gRPC framing)."""
        s = pb.Sampling(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                        seed=sampling.seed or 0, has_seed=sampling.seed is not None)
        self._requests.put(pb.DeviceMessage(open=pb.Open(plan_hash=plan_hash, model_id=model_id, sampling=s,
                                                         max_tokens=max_tokens, resume_session=resume_session)))
        metadata = [("authorization", f"Bearer {token}")] if token else None
        stub = pb_grpc.SplitInferenceStub(channel)
        self._responses = stub.Generate(self._request_iter(), metadata=metadata)
        opened = self._next()
        if opened.WhichOneof("kind") != "opened":
            raise RemoteError(f"expected Opened, got {opened.WhichOneof('kind')}")
        self.info = opened.opened
        self.bytes_up = 0
        self.last_compute_us = 0
        """Server time reported for the last step."""

    def _request_iter(self) -> Iterator[pb.DeviceMessage]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item

    def _next(self) -> pb.CloudMessage:
        try:
            msg = next(self._responses)
            self.bytes_down += msg.ByteSize()
        except grpc.RpcError as exc:
            raise RemoteError(f"{exc.code().name}: {exc.details()}", exc.code().name) from None
        except StopIteration:
            raise TransportError("the cloud closed the stream") from None
        if msg.WhichOneof("kind") == "error":
            raise RemoteError(f"error {msg.error.code}: {msg.error.message}")
        return msg

    def send(self, frame: bytes, want_token: bool = True, rows: int | None = None) -> int | None:
        """Send a frame of the next positions; with want_token, wait for the cloud's next token.
        `rows` (positions in the frame) is read from the frame unless given."""
        rows = parse_frame(frame).rows if rows is None else rows
        msg = pb.DeviceMessage(activations=pb.Activations(start_position=self.position, frame=frame, want_token=want_token))
        self._requests.put(msg)
        self.position += rows
        self.bytes_up += msg.ByteSize()
        if not want_token:
            return None
        token = self._next().token
        self.last_compute_us = token.compute_us
        return token.id

    def next_token(self, frame: bytes) -> int:
        return self.send(frame, True)

    def close(self, reason: str = "done") -> None:
        self._requests.put(pb.DeviceMessage(cancel=pb.Cancel(reason=reason)))
        self._requests.put(_CLOSE)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(address: str, root_certificates: bytes | None = None) -> grpc.Channel:
    """A channel to `address` (TLS when root certificates are given)."""
    if root_certificates is not None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
    return grpc.insecure_channel(address)


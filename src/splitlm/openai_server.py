"""An OpenAI-compatible HTTP endpoint on the device, answered by the split session (torch-free).

`splitlm device-serve --artifacts art --server cloud:50051 --port 8000` serves, on localhost:

* `POST /v1/chat/completions` (messages in the model's chat template) and `POST /v1/completions`
  (a prompt as it is), both with `"stream": true` as server-sent events;
* `GET /v1/models`, and `GET /health`.

so that apps written against the OpenAI API (or llama.cpp's server, or Ollama's OpenAI routes) work
unchanged. A request field that is not implemented is refused with 400, never ignored:
n > 1, tools, logprobs, penalties, response_format and the like. Generations run one at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from splitlm.api import Device
from splitlm.errors import ConfigError, RemoteError, SplitLMError, TransportError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "user"}
"""Request fields implemented (top_k as llama.cpp's server takes it; user is an opaque id, logged)."""
ZERO_OK = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False, "best_of": 1, "parallel_tool_calls": None}
"""Fields accepted only at their neutral value."""


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


class _ClientGone(Exception):
    """The HTTP client closed the stream: the generation is ended."""


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{name} must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def parse_request(body: Any, chat: bool, model_id: str) -> dict:
    """The generate() arguments of a request body; BadRequest naming the field that is wrong or not implemented."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    own = {"messages"} if chat else {"prompt", "suffix"}
    for key, value in body.items():
        if key in ZERO_OK:
            if value not in (ZERO_OK[key], None):
                raise BadRequest(f"{key}={value!r} is not implemented by this server (only {ZERO_OK[key]!r})", key)
        elif key not in COMMON | own:
            raise BadRequest(f"field {key!r} is not implemented by this server", key)
    if body.get("suffix"):
        raise BadRequest("suffix (insertion) is not implemented by this server", "suffix")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise BadRequest("n must be 1", "n")
    model = body.get("model", model_id)
    if not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {model!r}", "model")
    max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 20, integer=True) or \
        _number(body, "max_tokens", 256 if chat else 16, 1, 1 << 20, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop must be a string or a list of at most 4 strings", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest("stream_options takes include_usage only", "stream_options")
    args = dict(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                top_p=float(_number(body, "top_p", 1.0, 1e-9, 1)), top_k=_number(body, "top_k", 0, 0, 1 << 31, integer=True),
                seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True), stop=stop)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if isinstance(m, dict) and isinstance(m.get("content"), list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in m["content"]):
                    raise BadRequest(f"messages[{i}]: only text content parts are implemented", "messages")
                m = {**m, "content": "".join(p["text"] for p in m["content"])}
                messages[i] = m
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
                raise BadRequest(f"messages[{i}] must have role and content only (tool calls are not implemented)", "messages")
        args["prompt"] = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string (one prompt per request)", "prompt")
        args["prompt"] = prompt
    return dict(args=args, stream=bool(body.get("stream", False)), usage=bool(options.get("include_usage")), model=model)


def _finish(stop_reason: str) -> str:
    return "length" if stop_reason in ("max_tokens", "max_seq_len") else "stop"


class OpenAIServer:
    """The HTTP server; `port` once started, `stop()` to end it."""

    def __init__(self, device: Device, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
        self.device, self.api_key = device, api_key
        handler = type("Handler", (_Handler,), {"server_state": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="splitlm-openai", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_state: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # through logging, not stderr
        log.info("event=http %s", fmt % args)

    # -- plumbing ------------------------------------------------------------------
    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _authorized(self) -> bool:
        key = self.server_state.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "missing or wrong API key", kind="authentication_error")
        return False

    def _event(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except OSError:
            raise _ClientGone() from None

    # -- routes --------------------------------------------------------------------
    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server_state.device.model_id, "object": "model",
                                                          "created": 0, "owned_by": "splitlm"}]})
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        if not self._authorized():
            return
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._error(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                raise BadRequest(f"the request body must have a Content-Length of 1 to {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BadRequest(f"the request body is not JSON: {exc}") from None
            request = parse_request(body, chat, self.server_state.device.model_id)
            (self._stream if request["stream"] else self._whole)(request, chat)
        except BadRequest as exc:
            self._error(exc.status, str(exc), exc.param)
        except ConfigError as exc:  # a prompt the plan cannot hold, a chat template that does not render
            self._error(400, str(exc))
        except (RemoteError, TransportError) as exc:
            self._error(502, f"the cloud failed: {exc}", kind="server_error")
        except SplitLMError as exc:
            self._error(500, str(exc), kind="server_error")

    def _ids(self, chat: bool) -> tuple[str, str]:
        return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "chat.completion" if chat else "text_completion"

    def _whole(self, request: dict, chat: bool) -> None:
        result = self.server_state.device.generate(**request["args"])
        rid, kind = self._ids(chat)
        choice = {"index": 0, "finish_reason": _finish(result.stop_reason)}
        choice.update({"message": {"role": "assistant", "content": result.text}} if chat else {"text": result.text, "logprobs": None})
        self._json(200, {"id": rid, "object": kind, "created": int(time.time()), "model": request["model"], "choices": [choice],
                         "usage": self._usage(result)})

    @staticmethod
    def _usage(result) -> dict:
        return {"prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.token_ids),
                "total_tokens": len(result.prompt_ids) + len(result.token_ids)}

    def _stream(self, request: dict, chat: bool) -> None:
        device = self.server_state.device
        rid, kind = self._ids(chat)
        kind += ".chunk" if chat else ""
        created = int(time.time())
        stream = device.stream(**request["args"])

        def chunk(delta: dict | None, text: str | None, finish: str | None) -> dict:
            choice: dict = {"index": 0, "finish_reason": finish}
            choice.update({"delta": delta or {}} if chat else {"text": text or "", "logprobs": None})
            return {"id": rid, "object": kind, "created": created, "model": request["model"], "choices": [choice]}

        first = next(stream, None)  # a request the device refuses (a prompt too long) is a 400, not a broken stream
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if chat:
                self._event(chunk({"role": "assistant", "content": ""}, None, None))
            try:
                for piece in [first] if first is not None else []:
                    self._event(chunk({"content": piece}, piece, None))
                for piece in stream:
                    self._event(chunk({"content": piece}, piece, None))
            except SplitLMError as exc:  # the generation failed once the stream had begun
                self._event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
                return
            result = stream.result
            self._event(chunk({}, "", _finish(result.stop_reason)))
            if request["usage"]:
                self._event({"id": rid, "object": kind, "created": created, "model": request["model"], "choices": [],
                             "usage": self._usage(result)})
            self._event("[DONE]")
        except _ClientGone:
            stream.close()  # the generation ends at its next piece, and frees the device
            log.info("event=openai_client_gone id=%s", rid)

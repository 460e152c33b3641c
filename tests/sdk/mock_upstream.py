"""A mock bedrock-mantle: a threaded HTTP server on 127.0.0.1:0 that records every request it receives (method,
path, headers, body) and answers like the real upstream: OpenAI-shaped chat completions (plain and SSE, with the
final usage chunk when `stream_options.include_usage` is true), responses (create, SSE stream, retrieve, delete),
models list, and Anthropic messages (plain and SSE). A test can queue an error answer (e.g. a 429) for the next
request with `fail_next`, or have answers gzip-compressed when the request accepts it, as HTTP servers do.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MODELS = ["openai.gpt-oss-120b", "openai.gpt-oss-20b", "openai.gpt-5.4"]
CREATED = 1_764_000_000
# What every mocked answer says, split into the pieces that streams send one delta at a time.
TEXT_PIECES = ["Hello", " from", " the mock"]
TEXT = "".join(TEXT_PIECES)
RATE_LIMIT_BODY = {
    "error": {
        "message": "Too many requests, please wait before trying again (mock upstream).",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


@dataclass
class Seen:
    """One request as the mock received it."""

    method: str
    target: str  # path and query, exactly as sent
    headers: list[tuple[str, str]]  # (lower-cased name, value), in order, duplicates kept
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        assert len(values) <= 1, f"header {name} sent {len(values)} times upstream: {values}"
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def json(self):
        return json.loads(self.body)


@dataclass
class Scripted:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


class MockUpstream:
    """`verify`, if given, judges each request's credential as AWS would: a reason to refuse it (answered 403 as AWS
    answers a bad signature, with the reason's code), or None to serve it."""

    def __init__(self, verify=None) -> None:
        self.verify = verify
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._scripted: list[Scripted] = []
        self.gzip = False  # compress answers for requests that send Accept-Encoding: gzip
        # If set, each stream stops after its first event until the gate opens (and `streaming` is set).
        self.stream_gate: threading.Event | None = None
        self.streaming = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        # Handler threads may sit in keep-alive reads on the gateway's pooled connections: never join them.
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-upstream", daemon=True)

    @property
    def addr(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def start(self) -> "MockUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # --- what tests use -----------------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()
            self._scripted.clear()
            self.gzip = False

    def requests(self) -> list[Seen]:
        """Every request received since the last reset."""
        with self._lock:
            return list(self._seen)

    def only_request(self) -> Seen:
        """The single request received since the last reset."""
        seen = self.requests()
        assert len(seen) == 1, f"upstream received {len(seen)} requests, expected 1: {[(s.method, s.target) for s in seen]}"
        return seen[0]

    def fail_next(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        """Answers the next request with `status` and the JSON `body` instead of the normal answer."""
        with self._lock:
            self._scripted.append(Scripted(status, body, dict(headers or {})))

    def rate_limit_next(self) -> None:
        self.fail_next(429, RATE_LIMIT_BODY, {"retry-after": "7", "x-ratelimit-remaining-requests": "0"})

    # --- inside the server --------------------------------------------------------------------------------

    def _record(self, seen: Seen) -> Scripted | None:
        with self._lock:
            self._seen.append(seen)
            return self._scripted.pop(0) if self._scripted else None


def _make_handler(mock: MockUpstream):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # a stuck connection ends its thread eventually

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

        def do_GET(self):
            self._handle()

        def do_POST(self):
            self._handle()

        def do_DELETE(self):
            self._handle()

        def do_PUT(self):
            self._handle()

        def do_PATCH(self):
            self._handle()

        # --- plumbing ---

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        def _gzip(self) -> bool:
            return mock.gzip and "gzip" in (self.headers.get("accept-encoding") or "").lower()

        def _json(self, status: int, body, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            compress = self._gzip()
            if compress:
                data = gzip.compress(data)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            if compress:
                self.send_header("content-encoding", "gzip")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-mock-upstream", "1")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _sse(self, events) -> None:
            """Streams `events` ((event name or None, data str)) as SSE, one HTTP chunk per event."""
            compressor = zlib.compressobj(wbits=31) if self._gzip() else None  # gzip, flushed per event
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            if compressor:
                self.send_header("content-encoding", "gzip")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-mock-upstream", "1")
            self.end_headers()

            def chunk(raw: bytes) -> None:
                if raw:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
                    self.wfile.flush()

            for i, (name, data) in enumerate(events):
                raw = ((f"event: {name}\n" if name else "") + f"data: {data}\n\n").encode()
                chunk(compressor.compress(raw) + compressor.flush(zlib.Z_SYNC_FLUSH) if compressor else raw)
                if i == 0 and mock.stream_gate is not None:
                    mock.streaming.set()
                    mock.stream_gate.wait(timeout=30)
            if compressor:
                chunk(compressor.flush())
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _error(self, status: int, message: str, code: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})

        def _handle(self) -> None:
            body = self._read_body()
            headers = [(k.lower(), v) for k, v in self.headers.items()]
            seen = Seen(self.command, self.path, headers, body)
            refusal = mock.verify(seen) if mock.verify else None
            if refusal is not None:
                code, message = refusal
                mock._record(seen)
                self._json(403, {"__type": code, "message": f"mock upstream: {message}"}, {"x-amzn-errortype": code})
                return
            scripted = mock._record(seen)
            if scripted is not None:
                self._json(scripted.status, scripted.body, scripted.headers)
                return
            try:
                payload = json.loads(body) if body else {}
            except ValueError:
                self._error(400, "mock upstream: body is not JSON", "invalid_json")
                return
            self._route(seen, payload)

        def _route(self, seen: Seen, payload: dict) -> None:
            method, parts = seen.method, seen.path.strip("/").split("/")
            if parts[:1] == ["openai"]:
                parts = parts[1:]
            match (method, parts):
                case ("POST", ["v1", "chat", "completions"]):
                    self._chat(payload)
                case ("POST", ["v1", "responses"]):
                    self._responses_create(payload)
                case ("GET", ["v1", "responses", rid]):
                    self._json(200, response_object(rid, "openai.gpt-oss-120b"))
                case ("DELETE", ["v1", "responses", rid]):
                    self._json(200, {"id": rid, "object": "response.deleted", "deleted": True})
                case ("GET", ["v1", "models"]):
                    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "mock"} for m in MODELS]
                    self._json(200, {"object": "list", "data": data})
                case ("POST", ["anthropic", "v1", "messages"]):
                    self._messages(payload)
                case _:
                    self._error(404, f"mock upstream: no route {method} {seen.path}", "not_found")

        # --- the APIs ---

        def _chat(self, req: dict) -> None:
            model = req.get("model", "")
            usage = {"prompt_tokens": 11, "completion_tokens": len(TEXT_PIECES), "total_tokens": 11 + len(TEXT_PIECES)}
            if not req.get("stream"):
                self._json(
                    200,
                    {
                        "id": "chatcmpl-mock",
                        "object": "chat.completion",
                        "created": CREATED,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": TEXT, "refusal": None},
                                "logprobs": None,
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": usage,
                    },
                )
                return
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

            def chunk(delta: dict, finish=None, choices=True, with_usage=None):
                c = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED, "model": model}
                c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []
                if include_usage:
                    c["usage"] = with_usage
                return (None, json.dumps(c))

            events = [chunk({"role": "assistant", "content": ""})]
            events += [chunk({"content": piece}) for piece in TEXT_PIECES]
            events.append(chunk({}, finish="stop"))
            if include_usage:
                events.append(chunk({}, choices=False, with_usage=usage))
            events.append((None, "[DONE]"))
            self._sse(events)

        def _responses_create(self, req: dict) -> None:
            model = req.get("model", "")
            done = response_object("resp_mock", model)
            if not req.get("stream"):
                self._json(200, done)
                return
            started = dict(done, status="in_progress", output=[], usage=None)
            item_id = done["output"][0]["id"]
            part_empty = {"type": "output_text", "text": "", "annotations": []}
            item_empty = dict(done["output"][0], status="in_progress", content=[])
            events = [
                {"type": "response.created", "response": started},
                {"type": "response.in_progress", "response": started},
                {"type": "response.output_item.added", "output_index": 0, "item": item_empty},
                {"type": "response.content_part.added", "item_id": item_id, "output_index": 0, "content_index": 0, "part": part_empty},
            ]
            events += [
                {"type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}
                for piece in TEXT_PIECES
            ]
            events += [
                {"type": "response.output_text.done", "item_id": item_id, "output_index": 0, "content_index": 0, "text": TEXT, "logprobs": []},
                {"type": "response.content_part.done", "item_id": item_id, "output_index": 0, "content_index": 0, "part": done["output"][0]["content"][0]},
                {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]},
                {"type": "response.completed", "response": done},
            ]
            for n, e in enumerate(events):
                e["sequence_number"] = n
            self._sse([(e["type"], json.dumps(e)) for e in events])

        def _messages(self, req: dict) -> None:
            model = req.get("model", "")
            message = {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": TEXT}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 11, "output_tokens": len(TEXT_PIECES)},
            }
            if not req.get("stream"):
                self._json(200, message)
                return
            start = dict(message, content=[], stop_reason=None, usage={"input_tokens": 11, "output_tokens": 1})
            events = [
                {"type": "message_start", "message": start},
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                {"type": "ping"},
            ]
            events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in TEXT_PIECES]
            events += [
                {"type": "content_block_stop", "index": 0},
                {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": len(TEXT_PIECES)}},
                {"type": "message_stop"},
            ]
            self._sse([(e["type"], json.dumps(e)) for e in events])

    return Handler


def response_object(rid: str, model: str) -> dict:
    """A completed Responses API object."""
    return {
        "id": rid,
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_mock",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": TEXT, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "metadata": {},
        "usage": {
            "input_tokens": 11,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": len(TEXT_PIECES),
            "output_tokens_details": {"reasoning_tokens": 1},
            "total_tokens": 11 + len(TEXT_PIECES),
        },
    }

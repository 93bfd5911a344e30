"""A stand-in for the OpenAI and Anthropic APIs, on 127.0.0.1.

It answers `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages`
(Anthropic), as JSON or as SSE when the body says `"stream": true`, with
fixed token counts (`USAGE`) so tests can compare what vaultgate metered with
what the provider reported. Every request is recorded (path, headers, JSON
body) so tests can check what reached the provider: the real key, never the
virtual one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What the mock reports, per API and mode: (input tokens, output tokens).
USAGE = {
    ("openai", "json"): (11, 7),
    ("openai", "stream"): (13, 5),
    ("anthropic", "json"): (17, 9),
    ("anthropic", "stream"): (19, 6),
}

# The text of every answer, and how it is cut into stream deltas.
WORDS = ["Hello", " from", " the", " mock", " upstream."]
TEXT = "".join(WORDS)


@dataclass
class Recorded:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    raw_headers: list[tuple[str, str]]
    body: dict


class MockUpstream:
    """A threaded HTTP server that records what it is sent."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(_Handler):
            owner = upstream

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "MockUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, r: Recorded) -> None:
        with self._lock:
            self.requests.append(r)

    def snapshot(self) -> list[Recorded]:
        with self._lock:
            return list(self.requests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: MockUpstream

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet: pytest shows failures, not access logs

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_unparsed": raw.decode("utf-8", "replace")}
        self.owner.record(
            Recorded(
                method="POST",
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                raw_headers=list(self.headers.items()),
                body=body,
            )
        )
        stream = body.get("stream") is True
        if self.path == "/v1/chat/completions":
            if stream:
                self._sse(_openai_events(body))
            else:
                self._json(200, _openai_json(body))
        elif self.path == "/v1/messages":
            if stream:
                self._sse(_anthropic_events(body))
            else:
                self._json(200, _anthropic_json(body))
        else:
            self._json(404, {"error": {"type": "not_found", "message": self.path}})

    def _json(self, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[str]) -> None:
        """Sends each event as its own HTTP chunk, flushed, like a provider."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            data = event.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _openai_usage(mode: str) -> dict:
    i, o = USAGE[("openai", mode)]
    return {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o}


def _openai_json(body: dict) -> dict:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1700000000,
        "model": body.get("model", "unknown"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage("json"),
    }


def _openai_events(body: dict) -> list[str]:
    model = body.get("model", "unknown")

    def chunk(choices: list, **extra: object) -> str:
        doc = {
            "id": "chatcmpl-upstream",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(doc)}\n\n"

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for w in WORDS:
        events.append(chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]))
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if (body.get("stream_options") or {}).get("include_usage") is True:
        events.append(chunk([], usage=_openai_usage("stream")))
    events.append("data: [DONE]\n\n")
    return events


def _anthropic_json(body: dict) -> dict:
    i, o = USAGE[("anthropic", "json")]
    return {
        "id": "msg_upstream",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "unknown"),
        "content": [{"type": "text", "text": TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": i, "output_tokens": o},
    }


def _anthropic_events(body: dict) -> list[str]:
    i, o = USAGE[("anthropic", "stream")]

    def ev(name: str, doc: dict) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **doc})}\n\n"

    events = [
        ev(
            "message_start",
            {
                "message": {
                    "id": "msg_upstream",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model", "unknown"),
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": i, "output_tokens": 1},
                }
            },
        ),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("ping", {}),
    ]
    for w in WORDS:
        events.append(ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}}))
    events += [
        ev("content_block_stop", {"index": 0}),
        ev(
            "message_delta",
            {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": o}},
        ),
        ev("message_stop", {}),
    ]
    return events

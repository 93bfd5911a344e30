"""The official OpenAI and Anthropic Python SDKs, through vaultgate.

Each SDK changes only its base URL and its API key (a vaultgate virtual key).
Calls with `vpx_live_` keys reach the mock upstream, which must receive the
real provider key in the provider's own header and never the virtual key;
calls with the printed `vpx_test_` key are answered by the built-in mock
provider and never reach the upstream. Every successful call must be metered
with the token counts the provider reported.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from conftest import ANTHROPIC_SECRET, OPENAI_SECRET, Gateway
from mock_upstream import TEXT, USAGE, WORDS, Recorded

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def openai_client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/openai/v1", api_key=key, max_retries=0, timeout=30)


def anthropic_client(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0, timeout=30)


class UpstreamWatch:
    """The requests the upstream receives from here on."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._start = len(gw.upstream.snapshot())

    def new(self) -> list[Recorded]:
        return self._gw.upstream.snapshot()[self._start :]

    def one(self) -> Recorded:
        reqs = self.new()
        assert len(reqs) == 1, [r.path for r in reqs]
        return reqs[0]


def assert_no_virtual_key(rec: Recorded, virtual_key: str) -> None:
    """Nothing of the virtual key reached the provider: headers, path, body."""
    for name, value in rec.raw_headers:
        assert "vpx_" not in value, f"header {name} carries a virtual key"
    assert virtual_key not in rec.path and "vpx_" not in rec.path
    assert "vpx_" not in json.dumps(rec.body)


def assert_openai_credentials(rec: Recorded, virtual_key: str) -> None:
    assert rec.path == "/v1/chat/completions"
    auth = [v for k, v in rec.raw_headers if k.lower() == "authorization"]
    assert auth == [f"Bearer {OPENAI_SECRET}"]
    assert "x-api-key" not in rec.headers
    assert_no_virtual_key(rec, virtual_key)


def assert_anthropic_credentials(rec: Recorded, virtual_key: str) -> None:
    assert rec.path == "/v1/messages"
    keys = [v for k, v in rec.raw_headers if k.lower() == "x-api-key"]
    assert keys == [ANTHROPIC_SECRET]
    assert rec.headers.get("anthropic-version"), "anthropic-version was not forwarded"
    assert "authorization" not in rec.headers
    assert_no_virtual_key(rec, virtual_key)


def assert_metered(gw: Gateway, key: dict, expected: list[tuple[int, int]]) -> None:
    """The key's usage records carry the upstream's token counts and a cost."""
    records = gw.usage(key["id"], len(expected))
    got = sorted((r["tokens_in"], r["tokens_out"]) for r in records)
    assert got == sorted(expected), records
    for r in records:
        assert r["status"] == 200, r
        assert float(r["cost_usd"]) > 0, r


def assert_denial(err: openai.APIStatusError | anthropic.APIStatusError, status: int, code: str) -> None:
    """The JSON error body of docs/api.md#errors, readable by both SDK families."""
    assert err.status_code == status
    body = err.response.json()
    assert body["error"]["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert body["error"]["message"] == body["detail"], body
    assert body["error"]["type"], body


# --- OpenAI SDK, live key, mock upstream ----------------------------------


def test_openai_chat_completion(gateway: Gateway) -> None:
    key = gateway.create_key(name="openai json")
    watch = UpstreamWatch(gateway)
    resp = openai_client(gateway, key["key"]).chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
    assert resp.choices[0].message.content == TEXT
    i, o = USAGE[("openai", "json")]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (i, o, i + o)
    rec = watch.one()
    assert_openai_credentials(rec, key["key"])
    assert rec.body["model"] == OPENAI_MODEL
    assert_metered(gateway, key, [(i, o)])


def test_openai_stream_hides_the_usage_chunk_it_asked_for(gateway: Gateway) -> None:
    key = gateway.create_key(name="openai stream")
    watch = UpstreamWatch(gateway)
    stream = openai_client(gateway, key["key"]).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, stream=True
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == WORDS
    assert chunks[-1].choices[0].finish_reason == "stop"
    usage_chunks = [c for c in chunks if not c.choices or c.usage is not None]
    assert usage_chunks == [], "the client got a usage chunk it did not ask for"
    rec = watch.one()
    assert_openai_credentials(rec, key["key"])
    assert rec.body["stream"] is True
    assert rec.body["stream_options"]["include_usage"] is True, "vaultgate did not ask the stream for usage"
    assert_metered(gateway, key, [USAGE[("openai", "stream")]])


def test_openai_stream_keeps_the_usage_chunk_the_client_asked_for(gateway: Gateway) -> None:
    key = gateway.create_key(name="openai stream usage")
    watch = UpstreamWatch(gateway)
    stream = openai_client(gateway, key["key"]).chat.completions.create(
        model=OPENAI_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == WORDS
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1]
    i, o = USAGE[("openai", "stream")]
    assert (usage_chunks[0].usage.prompt_tokens, usage_chunks[0].usage.completion_tokens) == (i, o)
    rec = watch.one()
    assert_openai_credentials(rec, key["key"])
    assert rec.body["stream_options"] == {"include_usage": True}
    assert_metered(gateway, key, [(i, o)])


# --- Anthropic SDK, live key, mock upstream -------------------------------


def test_anthropic_message(gateway: Gateway) -> None:
    key = gateway.create_key(name="anthropic json")
    watch = UpstreamWatch(gateway)
    msg = anthropic_client(gateway, key["key"]).messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES
    )
    assert [b.text for b in msg.content] == [TEXT]
    i, o = USAGE[("anthropic", "json")]
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (i, o)
    rec = watch.one()
    assert_anthropic_credentials(rec, key["key"])
    assert rec.body["model"] == ANTHROPIC_MODEL
    assert_metered(gateway, key, [(i, o)])


def test_anthropic_stream(gateway: Gateway) -> None:
    key = gateway.create_key(name="anthropic stream")
    watch = UpstreamWatch(gateway)
    with anthropic_client(gateway, key["key"]).messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == WORDS
    assert [b.text for b in final.content] == [TEXT]
    assert final.stop_reason == "end_turn"
    i, o = USAGE[("anthropic", "stream")]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (i, o)
    rec = watch.one()
    assert_anthropic_credentials(rec, key["key"])
    assert rec.body["stream"] is True
    assert_metered(gateway, key, [(i, o)])


# --- Denials, as the SDKs see them ----------------------------------------


def test_revoked_key_is_an_authentication_error(gateway: Gateway) -> None:
    key = gateway.create_key(name="revoked")
    gateway.revoke(key["id"])
    watch = UpstreamWatch(gateway)
    with pytest.raises(openai.AuthenticationError) as oe:
        openai_client(gateway, key["key"]).chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
    assert_denial(oe.value, 401, "key_revoked")
    with pytest.raises(anthropic.AuthenticationError) as ae:
        anthropic_client(gateway, key["key"]).messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES
        )
    assert_denial(ae.value, 401, "key_revoked")
    assert watch.new() == []


def test_model_outside_the_allowlist_is_permission_denied(gateway: Gateway) -> None:
    key = gateway.create_key(name="allowlist", models=[OPENAI_MODEL, "claude-3-5-haiku-*"])
    watch = UpstreamWatch(gateway)
    with pytest.raises(openai.PermissionDeniedError) as oe:
        openai_client(gateway, key["key"]).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert_denial(oe.value, 403, "model_not_allowed")
    assert "gpt-4o" in oe.value.response.json()["detail"]
    with pytest.raises(anthropic.PermissionDeniedError) as ae:
        anthropic_client(gateway, key["key"]).messages.create(
            model="claude-sonnet-4-20250514", max_tokens=64, messages=MESSAGES
        )
    assert_denial(ae.value, 403, "model_not_allowed")
    assert watch.new() == []
    # The allowed models still go through on the same key.
    openai_client(gateway, key["key"]).chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
    assert len(watch.new()) == 1


def test_zero_budget_key_gets_402(gateway: Gateway) -> None:
    key = gateway.create_key(name="no budget", budget={"limit_usd": 0, "period": "total"})
    watch = UpstreamWatch(gateway)
    with pytest.raises(openai.APIStatusError) as oe:
        openai_client(gateway, key["key"]).chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
    assert_denial(oe.value, 402, "budget_exceeded")
    with pytest.raises(anthropic.APIStatusError) as ae:
        anthropic_client(gateway, key["key"]).messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES
        )
    assert_denial(ae.value, 402, "budget_exceeded")
    assert watch.new() == []


# --- The printed test key: the built-in mock provider, no upstream --------


def test_test_key_works_offline_through_both_sdks(gateway: Gateway) -> None:
    test_key = gateway.test_key
    watch = UpstreamWatch(gateway)

    seen: list[tuple[int, int]] = []  # what the SDK reported, per call

    oa = openai_client(gateway, test_key)
    resp = oa.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES, max_tokens=20)
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    seen.append((resp.usage.prompt_tokens, resp.usage.completion_tokens))

    chunks = list(oa.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c for c in chunks if not c.choices or c.usage is not None] == []

    chunks = list(
        oa.chat.completions.create(
            model=OPENAI_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    seen.append((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))

    an = anthropic_client(gateway, test_key)
    msg = an.messages.create(model=ANTHROPIC_MODEL, max_tokens=20, messages=MESSAGES)
    assert msg.content[0].text
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    seen.append((msg.usage.input_tokens, msg.usage.output_tokens))
    with an.messages.stream(model=ANTHROPIC_MODEL, max_tokens=20, messages=MESSAGES) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed and final.content[0].text == streamed
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    seen.append((final.usage.input_tokens, final.usage.output_tokens))

    assert watch.new() == [], "a test key reached the upstream"

    # Metered like live calls: five records, four of them with the counts the
    # SDK saw (the fifth is the stream whose usage chunk was hidden).
    status, keys = gateway.call("GET", "/v1/keys")
    assert status == 200, keys
    (record,) = [k for k in keys["data"] if k["prefix"] and test_key.startswith(k["prefix"])]
    records = gateway.usage(record["id"], 5)
    assert len(records) == 5, records
    metered = [(r["tokens_in"], r["tokens_out"]) for r in records]
    for pair in seen:
        assert pair in metered, (pair, records)
    for r in records:
        assert r["status"] == 200 and r["tokens_in"] > 0 and r["tokens_out"] > 0, r
        assert float(r["cost_usd"]) > 0, r

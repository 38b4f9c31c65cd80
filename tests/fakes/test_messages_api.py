"""Tests of FakeMessagesAPI, driven through the real anthropic SDK client."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import anyio
import anyio.to_thread
import pytest

from tests.fakes.messages_api import (
    DEFAULT_USAGE,
    ErrorReply,
    FakeMessagesAPI,
    Hold,
    Reply,
    text,
    tool_use,
)

MODEL = "claude-test-model"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
TOOLS: list[Any] = [
    {
        "name": "lookup",
        "description": "Look something up.",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


def client_for(fake: FakeMessagesAPI) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)


async def wait_started(hold: Hold) -> None:
    """Waits, off the event loop, until the fake has sent the held response's first events."""
    assert await anyio.to_thread.run_sync(hold.started.wait, 5, abandon_on_cancel=True)


@pytest.mark.asyncio
async def test_non_streaming_text_round_trip() -> None:
    usage = {
        "input_tokens": 42,
        "output_tokens": 7,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 2,
    }
    with FakeMessagesAPI([text("Hello there", usage=usage)]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                msg = await client.messages.create(
                    model=MODEL, max_tokens=100, messages=MESSAGES, tools=TOOLS
                )

        assert msg.content[0].type == "text"
        assert msg.content[0].text == "Hello there"
        assert msg.stop_reason == "end_turn"
        assert msg.model == MODEL
        assert msg.id.startswith("msg_")
        assert msg.usage.input_tokens == 42
        assert msg.usage.output_tokens == 7
        assert msg.usage.cache_read_input_tokens == 3
        assert msg.usage.cache_creation_input_tokens == 2

        assert len(fake.requests) == 1
        sent = fake.requests[0]
        assert sent["model"] == MODEL
        assert sent["max_tokens"] == 100
        assert sent["messages"] == MESSAGES
        assert sent["tools"] == TOOLS
        assert "stream" not in sent
        # SDK 2.12 sends api_key as a bearer token rather than x-api-key.
        assert fake.request_headers[0]["authorization"] == "Bearer test"
        assert fake.request_headers[0]["anthropic-version"]
        fake.assert_complete()


@pytest.mark.asyncio
async def test_non_streaming_tool_use_and_model_override() -> None:
    reply = tool_use("lookup", {"q": "x"}, id="toolu_fixed", text="Checking.")
    reply.model = "claude-other"
    with FakeMessagesAPI([reply]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                msg = await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)

    assert msg.model == "claude-other"
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    block = msg.content[1]
    assert block.type == "tool_use"
    assert (block.id, block.name, block.input) == ("toolu_fixed", "lookup", {"q": "x"})


@pytest.mark.asyncio
async def test_streaming_text_arrives_in_chunks_and_accumulates() -> None:
    words = "The quick brown fox jumps over the lazy dog, naïvely — 🦊."
    with FakeMessagesAPI([text(words)]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                async with client.messages.stream(
                    model=MODEL, max_tokens=100, messages=MESSAGES
                ) as stream:
                    deltas = [chunk async for chunk in stream.text_stream]
                    final = await stream.get_final_message()

        assert len(deltas) > 1
        assert "".join(deltas) == words
        assert final.content[0].type == "text"
        assert final.content[0].text == words
        assert final.stop_reason == "end_turn"
        assert final.stop_sequence is None
        assert final.usage.input_tokens == DEFAULT_USAGE["input_tokens"]
        assert final.usage.output_tokens == DEFAULT_USAGE["output_tokens"]
        assert fake.requests[0]["stream"] is True


@pytest.mark.asyncio
async def test_streaming_tool_use_input_is_reconstructed_exactly() -> None:
    tool_input: dict[str, Any] = {
        "query": 'Grüße aus Köln — "quoted" \\ backslash\nnewline',
        "emoji": "🚀✨",
        "nested": {"list": [1, 2.5, None, True, {"deep": ["a", {"deeper": {}}]}], "empty": []},
        "number": -17,
    }
    usage = {
        "input_tokens": 123,
        "output_tokens": 45,
        "cache_read_input_tokens": 6,
        "cache_creation_input_tokens": 7,
    }
    reply = tool_use("lookup", tool_input, id="toolu_abc123", text="Let me look that up.")
    reply.usage = usage
    with FakeMessagesAPI([reply]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                async with client.messages.stream(
                    model=MODEL, max_tokens=100, messages=MESSAGES, tools=TOOLS
                ) as stream:
                    deltas: list[str] = []
                    async for event in stream:
                        if event.type == "text":
                            deltas.append(event.text)
                    final = await stream.get_final_message()

        assert "".join(deltas) == "Let me look that up."
        assert [b.type for b in final.content] == ["text", "tool_use"]
        block = final.content[1]
        assert block.type == "tool_use"
        assert block.id == "toolu_abc123"
        assert block.name == "lookup"
        assert block.input == tool_input
        assert final.stop_reason == "tool_use"
        assert final.usage.input_tokens == 123
        assert final.usage.output_tokens == 45
        assert final.usage.cache_read_input_tokens == 6
        assert final.usage.cache_creation_input_tokens == 7
        assert fake.requests[0]["tools"] == TOOLS


@pytest.mark.asyncio
async def test_raw_stream_event_order() -> None:
    reply = tool_use("lookup", {"q": "x"}, text="ok")
    with FakeMessagesAPI([reply]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                stream = await client.messages.create(
                    model=MODEL, max_tokens=10, messages=MESSAGES, stream=True
                )
                async with stream:
                    types = [(e.type, getattr(e, "index", None)) async for e in stream]

    # The SDK drops the ping frame; everything else arrives in the real API's order, with
    # "ok" split into two text deltas and tool input opened by an empty partial_json delta.
    assert types == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        *[("content_block_delta", 1)] * 4,
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]


@pytest.mark.asyncio
async def test_overloaded_error_529() -> None:
    with FakeMessagesAPI([ErrorReply(529, "overloaded_error", "too busy")]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10), pytest.raises(anthropic.APIStatusError) as info:
                await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
        fake.assert_complete()

    err = info.value
    assert err.status_code == 529
    assert isinstance(err, anthropic.InternalServerError)
    assert isinstance(err, anthropic.OverloadedError)
    assert err.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "too busy"},
    }
    assert err.request_id is not None
    assert err.request_id.startswith("req_")


@pytest.mark.asyncio
async def test_rate_limit_429_on_stream_with_headers() -> None:
    error = ErrorReply(429, "rate_limit_error", headers={"retry-after": "7"})
    with FakeMessagesAPI([error]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10), pytest.raises(anthropic.RateLimitError) as info:
                async with client.messages.stream(
                    model=MODEL, max_tokens=10, messages=MESSAGES
                ) as stream:
                    await stream.get_final_message()

    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.message.endswith("'scripted error'}}")


@pytest.mark.asyncio
async def test_exhausted_script_answers_500() -> None:
    with FakeMessagesAPI([text("one")]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                first = await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
                with pytest.raises(anthropic.InternalServerError) as info:
                    await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)

        fake.assert_complete()
    assert first.content[0].type == "text"
    assert info.value.status_code == 500
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "FakeMessagesAPI: script exhausted (request #2)"},
    }
    assert len(fake.requests) == 2


def test_assert_complete_lists_unconsumed_steps() -> None:
    fake = FakeMessagesAPI([text("never sent")])
    fake.add(ErrorReply(500, "api_error"))
    assert fake.remaining() == 2
    with pytest.raises(AssertionError, match=r"(?s)2 unconsumed step\(s\).*never sent.*api_error"):
        fake.assert_complete()
    FakeMessagesAPI().assert_complete()


@pytest.mark.asyncio
async def test_default_and_callable_steps() -> None:
    seen: list[dict[str, Any]] = []

    def echo(body: dict[str, Any]) -> Reply:
        seen.append(body)
        return text(f"you said {body['messages'][-1]['content']}")

    with FakeMessagesAPI([echo], default=text("default")) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                replies = [
                    await client.messages.create(
                        model=MODEL,
                        max_tokens=10,
                        messages=[{"role": "user", "content": word}],
                    )
                    for word in ("ping", "again", "more")
                ]
        fake.assert_complete()

    texts = [r.content[0].text for r in replies if r.content[0].type == "text"]
    assert texts == ["you said ping", "default", "default"]
    assert seen == [fake.requests[0]]


@pytest.mark.asyncio
async def test_callable_step_that_raises_is_reported() -> None:
    def broken(body: dict[str, Any]) -> Reply:
        raise ValueError("bad step")

    with FakeMessagesAPI([broken]) as fake:
        async with client_for(fake) as client:
            with anyio.fail_after(10), pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
        with pytest.raises(AssertionError, match="bad step"):
            fake.assert_complete()


@pytest.mark.asyncio
async def test_wait_for_requests() -> None:
    with FakeMessagesAPI([text("a")]) as fake:
        with pytest.raises(AssertionError, match="expected 1 request"):
            fake.wait_for_requests(1, timeout=0.01)
        async with client_for(fake) as client:
            with anyio.fail_after(10):
                await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
        fake.wait_for_requests(1, timeout=0)


@pytest.mark.asyncio
async def test_hold_then_cancel_does_not_hang() -> None:
    hold = Hold(text_before="Thinking about")
    received: list[str] = []
    first_text = anyio.Event()

    with FakeMessagesAPI([hold]) as fake:
        async with client_for(fake) as client:

            async def consume() -> None:
                async with client.messages.stream(
                    model=MODEL, max_tokens=10, messages=MESSAGES
                ) as stream:
                    async for chunk in stream.text_stream:
                        received.append(chunk)
                        first_text.set()

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await wait_started(hold)
                    await first_text.wait()
                    tg.cancel_scope.cancel()

        stopping = time.monotonic()
    # stop() joins the server thread; it must not wait for the abandoned Hold.
    assert time.monotonic() - stopping < 3
    assert received == ["Thinking about"]
    assert not hold.release.is_set()
    fake.assert_complete()


@pytest.mark.asyncio
async def test_hold_released_finishes_stream() -> None:
    hold = Hold(
        text_before="Hel",
        then=tool_use("lookup", {"q": "ä"}, id="toolu_after", text="lo"),
    )
    received: list[str] = []
    first_text = anyio.Event()
    result: list[Any] = []

    with FakeMessagesAPI([hold]) as fake:
        async with client_for(fake) as client:

            async def consume() -> None:
                async with client.messages.stream(
                    model=MODEL, max_tokens=10, messages=MESSAGES
                ) as stream:
                    async for chunk in stream.text_stream:
                        received.append(chunk)
                        first_text.set()
                    result.append(await stream.get_final_message())

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await wait_started(hold)
                    await first_text.wait()
                    assert received == ["Hel"]
                    hold.release.set()
        fake.assert_complete()

    assert "".join(received) == "Hello"
    (final,) = result
    assert [b.type for b in final.content] == ["text", "text", "tool_use"]
    assert final.content[0].text == "Hel"
    assert final.content[1].text == "lo"
    assert final.content[2].input == {"q": "ä"}
    assert final.stop_reason == "tool_use"


@pytest.mark.asyncio
async def test_hold_non_streaming_waits_for_release() -> None:
    hold = Hold(text_before="partial ", then=text("rest"))
    result: list[anthropic.types.Message] = []

    with FakeMessagesAPI([hold]) as fake:
        async with client_for(fake) as client:

            async def create() -> None:
                result.append(
                    await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
                )

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(create)
                    await wait_started(hold)
                    assert result == []
                    hold.release.set()

    (msg,) = result
    assert [b.text for b in msg.content if b.type == "text"] == ["partial ", "rest"]


@pytest.mark.asyncio
async def test_stop_while_held_ends_stream_with_error_event() -> None:
    hold = Hold(text_before="x")
    errors: list[BaseException] = []
    fake = FakeMessagesAPI([hold])
    fake.start()
    try:
        async with client_for(fake) as client:

            async def consume() -> None:
                try:
                    async with client.messages.stream(
                        model=MODEL, max_tokens=10, messages=MESSAGES
                    ) as stream:
                        await stream.get_final_message()
                except anthropic.APIStatusError as e:
                    errors.append(e)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await wait_started(hold)
                    await anyio.to_thread.run_sync(fake.stop)
    finally:
        fake.stop()

    (err,) = errors
    assert isinstance(err, anthropic.APIStatusError)
    # A mid-stream error event is raised with the stream's own HTTP status, 200.
    assert err.status_code == 200
    assert err.body == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "FakeMessagesAPI stopped while a Hold was pending",
        },
    }

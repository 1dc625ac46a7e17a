"""The providers: ``openai`` through the real SDK over real HTTP to the fake upstream, and ``demo``.

Rules: the fake upstream listens on 127.0.0.1 with port 0; every test that does I/O runs under a
``trio.fail_after``; exact failure points come from the fake's script (after token k) and its
gate, never from sleeping. The demo's pacing is checked on the autojump clock; the openai tests
run on the real clock (the SDK does some work in a thread, which autojump would skip past), so
the read-timeout tests use a short timeout, and only they do: every other test leaves the
upstream 30 s to answer, so that a loaded machine does not turn a pause into a silence. A failure
must reach the caller as ``UpstreamError`` with the right ``code`` and cause (or as
``trio.Cancelled``), nothing else. Every test runs twice: over chatsrv's lean HTTP transport and
over httpx2's, the SDK's default (``CHATSRV_LLM_TRANSPORT``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio

from chatsrv._errors import UpstreamError
from chatsrv._settings import Settings
from chatsrv.upstream import Completion, Prompt, Provider, open_provider
from chatsrv.upstream._http11 import Http11Transport
from chatsrv.upstream._openai import KEYLESS_PLACEHOLDER, OpenAIProvider, _http_client
from tests.fake_upstream import DEFAULT_TOKENS, DEFAULT_USAGE, FakeUpstream, Script, refusing_port

TOKENS = [f" tok{i}" for i in range(20)]
PROMPT = Prompt(
    model="test-model",
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say something."},
    ],
)


@pytest.fixture(autouse=True, params=["lean", "httpx"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CHATSRV_LLM_TRANSPORT", request.param)
    return str(request.param)


def openai_settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "llm_provider": "openai",
        "llm_base_url": base_url,
        "llm_max_retries": 0,
        "llm_timeout_s": 30.0,
    }
    return Settings(**(values | overrides))


@pytest.fixture
async def provider(upstream: FakeUpstream) -> AsyncIterator[Provider]:
    async with open_provider(openai_settings(upstream.base_url)) as opened:
        yield opened


async def generate(provider: Provider, prompt: Prompt = PROMPT) -> tuple[list[str], Completion]:
    deltas: list[str] = []
    with trio.fail_after(10):
        completion = await provider.generate(prompt, deltas.append)
    return deltas, completion


async def generate_failing(provider: Provider) -> tuple[list[str], UpstreamError]:
    """Run a generate that must fail; any exception but UpstreamError fails the test."""
    deltas: list[str] = []
    with trio.fail_after(10), pytest.raises(UpstreamError) as caught:
        await provider.generate(PROMPT, deltas.append)
    return deltas, caught.value


# --- openai: the happy path ---------------------------------------------------------------------


async def test_complete_stream(provider: Provider, upstream: FakeUpstream) -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27}
    upstream.script = Script(tokens=TOKENS, finish_reason="length", usage=usage)

    deltas, completion = await generate(provider)

    assert deltas == TOKENS  # one emit per delta, in order, none empty (the role chunk is not)
    assert completion == Completion(finish_reason="length", usage=usage)
    [request] = upstream.requests
    assert request["model"] == "test-model"
    assert request["messages"] == PROMPT.messages
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert upstream.disconnects == 0


async def test_defaults_and_reused_connection(provider: Provider, upstream: FakeUpstream) -> None:
    for _ in range(2):
        deltas, completion = await generate(provider)
        assert deltas == list(DEFAULT_TOKENS)
        assert completion == Completion(finish_reason="stop", usage=DEFAULT_USAGE)
    # Both bodies were read to their end, so the second request reused the first's connection.
    assert len(upstream.clients) == 1
    assert upstream.disconnects == 0


async def test_no_usage_chunk(provider: Provider, upstream: FakeUpstream) -> None:
    upstream.script.usage = None
    deltas, completion = await generate(provider)
    assert deltas == list(DEFAULT_TOKENS)
    assert completion == Completion(finish_reason="stop", usage=None)


async def test_keyless_endpoint_gets_a_placeholder_key(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local server takes no key; the SDK still needs one to build its client.
    monkeypatch.delenv("CHATSRV_LLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = Settings(llm_provider="openai", llm_base_url=upstream.base_url, llm_max_retries=0)
    async with open_provider(settings) as opened:
        assert opened.name == "openai"
        deltas, _ = await generate(opened)
    assert deltas == list(DEFAULT_TOKENS)
    [headers] = upstream.request_headers
    assert headers["authorization"] == f"Bearer {KEYLESS_PLACEHOLDER}"


# --- openai: failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_error_status_before_the_first_token(
    provider: Provider, upstream: FakeUpstream, status: int
) -> None:
    upstream.script.error_status = status

    deltas, error = await generate_failing(provider)

    assert (error.code, error.status_code) == ("upstream_status", status)
    assert "scripted failure" in error.message  # the upstream's own message is kept
    assert deltas == []
    assert len(upstream.requests) == 1  # max_retries=0: no retry


@pytest.mark.parametrize("k", [0, 1, 3])
async def test_connection_broken_after_k_tokens(
    provider: Provider, upstream: FakeUpstream, k: int
) -> None:
    upstream.script = Script(tokens=TOKENS, fail_after=k)

    deltas, error = await generate_failing(provider)

    assert deltas == TOKENS[:k]
    # The body was cut off: a stream that ended early, not a clean Completion.
    assert error.code == "upstream_protocol"
    assert upstream.tokens_sent == k


async def test_error_object_mid_stream(provider: Provider, upstream: FakeUpstream) -> None:
    upstream.script = Script(tokens=TOKENS, error_after=2)

    deltas, error = await generate_failing(provider)

    assert deltas == TOKENS[:2]
    assert error.code == "upstream_error"
    assert "scripted mid-stream failure" in error.message


@pytest.mark.parametrize("script", [Script(truncate_after=2), Script(garbage_after=2)])
async def test_malformed_stream(provider: Provider, upstream: FakeUpstream, script: Script) -> None:
    upstream.script = script

    deltas, error = await generate_failing(provider)

    assert deltas == list(DEFAULT_TOKENS[:2])
    assert error.code == "upstream_protocol"


async def test_unreachable_upstream() -> None:
    with refusing_port() as port:
        async with open_provider(openai_settings(f"http://127.0.0.1:{port}/v1")) as opened:
            deltas, error = await generate_failing(opened)
    assert error.code == "upstream_connection"
    assert "cannot reach the upstream" in error.message
    assert deltas == []


@contextlib.asynccontextmanager
async def raw_upstream(
    handle: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[str]:
    """A loopback server that runs ``handle`` on each connection; yields its base URL."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        [listener] = await nursery.start(serve)
        yield f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1"
        nursery.cancel_scope.cancel()


async def test_upstream_hanging_up_before_answering() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with (
        raw_upstream(hang_up) as base_url,
        open_provider(openai_settings(base_url)) as opened,
    ):
        deltas, error = await generate_failing(opened)
    assert error.code == "upstream_connection"
    assert deltas == []


# The timeout tests run on the real clock: the SDK does work in a thread (and sockets complete on
# their own time), which the autojump clock would skip past. 1 s: a machine busy with other work
# may pause a process for a good part of a second, which must not look like a silence where the
# upstream is talking; and it keeps each of these tests to a second or two.
SILENCE_TIMEOUT_S = 1.0
# The longest silence the watch allows: it strikes after between the timeout and 17/16 of it.
LONGEST_SILENCE_S = SILENCE_TIMEOUT_S * 17 / 16


async def test_silent_upstream_times_out(upstream: FakeUpstream) -> None:
    upstream.script = Script(tokens=TOKENS, stall_after=2)
    settings = openai_settings(upstream.base_url, llm_timeout_s=SILENCE_TIMEOUT_S)
    async with open_provider(settings) as opened:
        start = trio.current_time()
        deltas, error = await generate_failing(opened)
        assert trio.current_time() - start >= SILENCE_TIMEOUT_S
    assert error.code == "upstream_connection"
    assert f"sent nothing for {SILENCE_TIMEOUT_S:g} s" in error.message
    assert deltas == TOKENS[:2]
    with trio.fail_after(10):
        await upstream.wait_disconnected()


async def test_upstream_silent_before_answering_times_out() -> None:
    """Each attempt waits llm_timeout_s for a response head; then the SDK's error says so."""
    connections = 0

    async def never_answer(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await trio.sleep_forever()

    async with raw_upstream(never_answer) as base_url:
        settings = openai_settings(base_url, llm_timeout_s=SILENCE_TIMEOUT_S)
        async with open_provider(settings) as opened:
            start = trio.current_time()
            deltas, error = await generate_failing(opened)
            assert trio.current_time() - start >= SILENCE_TIMEOUT_S
    assert error.code == "upstream_connection"
    assert "did not answer in time" in error.message
    assert deltas == []
    assert connections == 1  # max_retries=0: one attempt, which alone took the whole timeout


async def test_a_stream_longer_than_the_timeout_is_not_cut(upstream: FakeUpstream) -> None:
    """The silence watch moves with the lines: 1.52 s of tokens 80 ms apart, a 1 s timeout."""
    upstream.script = Script(tokens=TOKENS, interval_s=0.08)
    settings = openai_settings(upstream.base_url, llm_timeout_s=SILENCE_TIMEOUT_S)
    async with open_provider(settings) as opened:
        start = trio.current_time()
        deltas, completion = await generate(opened)
        # Longer than a watch that never moved would have allowed.
        assert trio.current_time() - start > LONGEST_SILENCE_S
    assert deltas == TOKENS
    assert completion.finish_reason == "stop"


async def test_retries_of_a_refusal_do_not_count_as_silence(upstream: FakeUpstream) -> None:
    """The SDK's wait before its retry (the 429's retry-after, 1.5 s) outlasts the 1 s timeout:
    the error is still the upstream's status, once the retry was refused too, not a silence."""
    upstream.script = Script(error_status=429, retry_after_s=1.5)
    settings = openai_settings(
        upstream.base_url, llm_timeout_s=SILENCE_TIMEOUT_S, llm_max_retries=1
    )
    async with open_provider(settings) as opened:
        deltas, error = await generate_failing(opened)
    assert (error.code, error.status_code) == ("upstream_status", 429)
    assert deltas == []
    # max_retries=1: the request and the SDK's one retry of it, which came after a wait longer
    # than any silence the watch allows.
    assert [h["x-stainless-retry-count"] for h in upstream.request_headers] == ["0", "1"]
    first, retry = upstream.request_times
    assert retry - first > LONGEST_SILENCE_S


Cause = type[Exception] | None

# Each fault, the code it must end in, and the exception that UpstreamError must be raised from:
# the SDK's for a refusal, httpx2's for a body cut off, orjson's for a line that is not JSON;
# none where chatsrv itself finds the fault (an error object, a stream ended short, a silence).
# Where the causes allowed differ between the transports, they are given for each.
FAULTS = [
    pytest.param(
        Script(error_status=500), "upstream_status", openai.InternalServerError, id="status-500"
    ),
    pytest.param(
        Script(error_status=429), "upstream_status", openai.RateLimitError, id="status-429"
    ),
    pytest.param(
        Script(fail_after=0), "upstream_protocol", httpx2.RemoteProtocolError, id="broken-at-0"
    ),
    pytest.param(
        Script(fail_after=3), "upstream_protocol", httpx2.RemoteProtocolError, id="broken-at-3"
    ),
    pytest.param(Script(error_after=0), "upstream_error", None, id="error-object"),
    pytest.param(Script(truncate_after=3), "upstream_protocol", None, id="truncated"),
    pytest.param(
        Script(garbage_after=0), "upstream_protocol", orjson.JSONDecodeError, id="not-json"
    ),
    # The lean transport leaves body reads untimed: only chatsrv's own watch can notice the
    # silence. On httpx2's transport each read is also timed, by llm_timeout_s from its start,
    # and which of the two strikes first depends on when the last line came within the watch's
    # 1/16 step: usually httpx2's read timeout, but a pause in the client lets the watch win.
    pytest.param(
        Script(stall_after=1),
        "upstream_connection",
        {"lean": {None}, "httpx": {httpx2.ReadTimeout, None}},
        id="silent",
    ),
]


@pytest.mark.parametrize(("script", "code", "cause"), FAULTS)
async def test_only_upstream_error_escapes(
    upstream: FakeUpstream,
    transport: str,
    script: Script,
    code: str,
    cause: Cause | Mapping[str, set[Cause]],
) -> None:
    upstream.script = script
    # Only the silence needs a short timeout; the others must not see one.
    timeout_s = SILENCE_TIMEOUT_S if script.stall_after is not None else 30.0
    settings = openai_settings(upstream.base_url, llm_timeout_s=timeout_s)
    async with open_provider(settings) as opened:
        with trio.fail_after(10):
            try:
                await opened.generate(PROMPT, lambda _: None)
            except Exception as exc:
                escaped: Exception = exc
            else:
                pytest.fail("a faulty stream returned a Completion")
    # Not a subclass, not an openai or httpx2 type: exactly UpstreamError, with its cause kept.
    assert type(escaped) is UpstreamError, repr(escaped)
    assert escaped.code == code
    allowed = cause[transport] if isinstance(cause, Mapping) else {cause}
    kept = None if escaped.__cause__ is None else type(escaped.__cause__)
    assert kept in allowed, repr(escaped.__cause__)


async def test_emit_failure_propagates_and_drops_the_upstream(
    provider: Provider, upstream: FakeUpstream
) -> None:
    # The engine's emit is a channel's send_nowait: its exceptions are the engine's, not ours.
    # Four tokens of twenty: the body is still open when the fourth one's emit fails, whatever
    # the reads it came in (CHATSRV_FRAME_MS may gather them into one).
    upstream.script = Script(tokens=TOKENS, gated=True)
    upstream.release(4)
    deltas: list[str] = []

    def emit(text: str) -> None:
        if len(deltas) == 3:
            raise trio.WouldBlock
        deltas.append(text)

    with trio.fail_after(10):
        with pytest.raises(trio.WouldBlock):
            await provider.generate(PROMPT, emit)
        await upstream.wait_disconnected()
    assert deltas == TOKENS[:3]


# --- openai: cancellation -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 4])
async def test_cancel_after_k_deltas_closes_the_upstream(
    provider: Provider, upstream: FakeUpstream, k: int
) -> None:
    upstream.script = Script(tokens=TOKENS, gated=True)
    deltas: list[str] = []
    got_k = trio.Event()
    escaped: list[BaseException] = []

    def emit(text: str) -> None:
        deltas.append(text)
        if len(deltas) == k:
            got_k.set()

    async def turn(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await provider.generate(PROMPT, emit)
            except BaseException as exc:
                escaped.append(exc)
                raise

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(turn)
            await upstream.wait_requests(1)
            upstream.release(k)
            if k:
                await got_k.wait()
            scope.cancel(reason="the turn was cancelled")
            # The fake upstream sees the client go away: nobody pays for further tokens.
            await upstream.wait_disconnected()

    assert deltas == TOKENS[:k]
    assert [type(exc) for exc in escaped] == [trio.Cancelled]
    assert upstream.tokens_sent == k


# --- openai: the frame (CHATSRV_FRAME_MS) -------------------------------------------------------

# Long beside the loop's own delays, so that the real clock tells reads apart. The frame paces
# the lean transport's socket reads; httpx2's transport reads without it.
FRAME_MS = 300.0


@pytest.mark.parametrize("transport", ["lean"], indirect=True)
async def test_the_frame_gathers_what_comes_within_it_and_delays_nothing_else(
    upstream: FakeUpstream,
) -> None:
    upstream.script = Script(tokens=TOKENS[:5], gated=True)
    emitted: list[tuple[str, float]] = []
    arrived = trio.Event()

    def emit(text: str) -> None:
        emitted.append((text, trio.current_time()))
        arrived.set()

    async def next_delta() -> None:
        nonlocal arrived
        await arrived.wait()
        arrived = trio.Event()

    frame_s = FRAME_MS / 1000
    settings = openai_settings(upstream.base_url, frame_ms=FRAME_MS)
    async with open_provider(settings) as opened, trio.open_nursery() as nursery:
        with trio.fail_after(10):
            nursery.start_soon(opened.generate, PROMPT, emit)
            await upstream.wait_requests(1)
            # The first text is read at once.
            released = trio.current_time()
            upstream.release(1)
            await next_delta()
            assert emitted[0][1] - released < frame_s / 2
            # Two tokens sent within the frame wait for its end, and come in one read.
            upstream.release(1)
            await trio.sleep(frame_s / 6)
            upstream.release(1)
            await next_delta()
            assert len(emitted) == 3, emitted
            assert emitted[1][1] - emitted[0][1] >= frame_s
            assert emitted[2][1] - emitted[1][1] < frame_s / 6
            # After a quiet frame, a token is read at once again.
            await trio.sleep(frame_s * 1.5)
            released = trio.current_time()
            upstream.release(1)
            await next_delta()
            assert emitted[3][1] - released < frame_s / 2
            upstream.release(1)

    assert [text for text, _ in emitted] == TOKENS[:5]


@pytest.mark.parametrize("transport", ["lean"], indirect=True)
async def test_a_cancel_in_the_frames_wait_stops_the_stream_at_once(
    upstream: FakeUpstream,
) -> None:
    upstream.script = Script(tokens=TOKENS, gated=True)
    got_first = trio.Event()
    escaped: list[BaseException] = []
    settings = openai_settings(upstream.base_url, frame_ms=1000.0)

    async def turn(opened: Provider, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await opened.generate(PROMPT, lambda _: got_first.set())
            except BaseException as exc:
                escaped.append(exc)
                raise

    async with open_provider(settings) as opened:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scope = await nursery.start(turn, opened)
                await upstream.wait_requests(1)
                upstream.release(2)  # the second comes while the first read's frame runs
                await got_first.wait()
                await trio.testing.wait_all_tasks_blocked()
                cancelled = trio.current_time()
                scope.cancel(reason="the turn was cancelled")
            assert trio.current_time() - cancelled < 0.2  # not at the frame's end, 1 s later
            await upstream.wait_disconnected()

    assert [type(exc) for exc in escaped] == [trio.Cancelled]


async def test_deadline_while_the_upstream_is_silent(
    provider: Provider, upstream: FakeUpstream
) -> None:
    upstream.script = Script(tokens=TOKENS, stall_after=5)
    deltas: list[str] = []

    with trio.fail_after(10):
        with trio.CancelScope() as scope:

            def emit(text: str) -> None:
                deltas.append(text)
                if len(deltas) == 5:  # the upstream now stalls: a deadline cuts the wait
                    scope.deadline = trio.current_time() + 0.05

            await provider.generate(PROMPT, emit)
        await upstream.wait_disconnected()

    assert scope.cancelled_caught
    assert deltas == TOKENS[:5]


# --- the factory --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "chosen"),
    [("HTTPS_PROXY", "httpx"), ("all_proxy", "httpx"), ("NO_PROXY", "lean"), (None, "lean")],
)
def test_auto_transport_leaves_proxies_to_httpx(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, chosen: str
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    if variable is not None:
        monkeypatch.setenv(variable, "http://proxy.invalid:3128")
    client = _http_client("auto")
    if chosen == "httpx":
        assert client is None  # the SDK builds its own, which honours the proxy
    else:
        assert client is not None and isinstance(client._transport, Http11Transport)


async def test_open_provider_closes_the_client(upstream: FakeUpstream) -> None:
    async with open_provider(openai_settings(upstream.base_url)) as opened:
        await generate(opened)
        assert isinstance(opened, OpenAIProvider)
        client = opened._client
        assert not client.is_closed()
    assert client.is_closed()


async def test_demo_is_the_default_without_an_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("CHATSRV_LLM_PROVIDER", "CHATSRV_LLM_BASE_URL", "CHATSRV_LLM_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with open_provider(Settings()) as opened:
        assert opened.name == "demo"


# --- demo -----------------------------------------------------------------------------------------


def demo_settings(interval_s: float = 0.05) -> Settings:
    return Settings(llm_provider="demo", demo_token_interval_s=interval_s)


def prompt_saying(text: str) -> Prompt:
    return Prompt(model="chatsrv-demo", messages=[{"role": "user", "content": text}])


async def test_demo_is_deterministic(autojump_clock: Any) -> None:
    async with open_provider(demo_settings()) as demo:
        assert demo.name == "demo"
        first, completion = await generate(demo, prompt_saying("How do cancel scopes work?"))
        again, _ = await generate(demo, prompt_saying("How do cancel scopes work?"))
        other, _ = await generate(demo, prompt_saying("What is structured concurrency?"))

    assert first == again
    assert first != other
    assert 30 <= len(first) <= 110
    assert all(first) and first[0].strip() and all(d[0] == " " for d in first[1:])
    assert "".join(first).count(".") >= 3  # a few sentences
    assert completion.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage["completion_tokens"] == len(first)
    assert completion.usage["total_tokens"] == (
        completion.usage["prompt_tokens"] + completion.usage["completion_tokens"]
    )


async def test_demo_answers_the_last_user_message(autojump_clock: Any) -> None:
    history = [
        {"role": "user", "content": "First question about channels"},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "Second question about nurseries"},
    ]
    async with open_provider(demo_settings()) as demo:
        deltas, _ = await generate(demo, Prompt(model="chatsrv-demo", messages=history))
        alone, _ = await generate(demo, prompt_saying("Second question about nurseries"))
        first, _ = await generate(demo, prompt_saying("First question about channels"))
    assert deltas == alone != first


async def test_demo_is_paced(autojump_clock: Any) -> None:
    times: list[float] = []
    async with open_provider(demo_settings(0.05)) as demo:
        start = trio.current_time()
        with trio.fail_after(60):
            await demo.generate(prompt_saying("pace"), lambda _: times.append(trio.current_time()))
    assert len(times) > 1  # (no emit at all would match the line below too)
    assert times == pytest.approx([start + 0.05 * (i + 1) for i in range(len(times))])


async def test_demo_is_cancellable(autojump_clock: Any) -> None:
    deltas: list[str] = []
    async with open_provider(demo_settings(0.05)) as demo:
        with trio.move_on_after(0.05 * 5.5) as scope:
            await demo.generate(prompt_saying("cancel me"), deltas.append)
    assert scope.cancelled_caught
    assert len(deltas) == 5

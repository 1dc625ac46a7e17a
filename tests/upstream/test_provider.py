"""The providers: ``openai`` through the real SDK over real HTTP to the fake upstream, and ``demo``.

Rules: the fake upstream listens on 127.0.0.1 with port 0; every test that does I/O runs under a
``trio.fail_after``; exact failure points come from the fake's script (after token k) and its
gate, never from sleeping. The demo's pacing is checked on the autojump clock; the openai tests
run on the real clock (the SDK does some work in a thread, which autojump would skip past), so
the read-timeout tests use a short timeout. A failure must reach the caller as ``UpstreamError``
with the right ``code`` (or as ``trio.Cancelled``), nothing else. Every test runs twice: over
chatsrv's lean HTTP transport and over httpx2's, the SDK's default (``CHATSRV_LLM_TRANSPORT``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from chatsrv._errors import UpstreamError
from chatsrv._settings import Settings
from chatsrv.upstream import Completion, Prompt, Provider, open_provider
from chatsrv.upstream._http11 import Http11Transport
from chatsrv.upstream._openai import OpenAIProvider, _http_client
from tests.fake_upstream import DEFAULT_TOKENS, DEFAULT_USAGE, FakeUpstream, Script

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


async def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    return port


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
    settings = openai_settings(f"http://127.0.0.1:{await closed_port()}/v1")
    async with open_provider(settings) as opened:
        deltas, error = await generate_failing(opened)
    assert error.code == "upstream_connection"
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
# their own time), which the autojump clock would skip past.
SILENCE_TIMEOUT_S = 0.5


async def test_silent_upstream_times_out(upstream: FakeUpstream) -> None:
    upstream.script = Script(tokens=TOKENS, stall_after=2)
    settings = openai_settings(upstream.base_url, llm_timeout_s=SILENCE_TIMEOUT_S)
    async with open_provider(settings) as opened:
        start = trio.current_time()
        deltas, error = await generate_failing(opened)
        assert trio.current_time() - start >= SILENCE_TIMEOUT_S
    assert error.code == "upstream_connection"
    assert "sent nothing for 0.5 s" in error.message
    assert deltas == TOKENS[:2]
    with trio.fail_after(10):
        await upstream.wait_disconnected()


async def test_upstream_silent_before_answering_times_out() -> None:
    """Each attempt waits llm_timeout_s for a response head; then the SDK's error says so."""

    async def never_answer(stream: trio.SocketStream) -> None:
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


async def test_a_stream_longer_than_the_timeout_is_not_cut(upstream: FakeUpstream) -> None:
    """The silence watch moves with the lines: 0.95 s of tokens 50 ms apart, a 0.5 s timeout."""
    upstream.script = Script(tokens=TOKENS, interval_s=0.05)
    settings = openai_settings(upstream.base_url, llm_timeout_s=SILENCE_TIMEOUT_S)
    async with open_provider(settings) as opened:
        start = trio.current_time()
        deltas, completion = await generate(opened)
        assert trio.current_time() - start > 1.5 * SILENCE_TIMEOUT_S
    assert deltas == TOKENS
    assert completion.finish_reason == "stop"


async def test_retries_of_a_refusal_do_not_count_as_silence(upstream: FakeUpstream) -> None:
    """The SDK's wait before a retry (~0.4-0.5 s for a 429) outlasts the 0.2 s timeout: the error
    is still the upstream's status, not a silence."""
    upstream.script = Script(error_status=429)
    settings = openai_settings(upstream.base_url, llm_timeout_s=0.2, llm_max_retries=1)
    async with open_provider(settings) as opened:
        deltas, error = await generate_failing(opened)
    assert (error.code, error.status_code) == ("upstream_status", 429)
    assert deltas == []


FAULTS = [
    pytest.param(Script(error_status=500), "upstream_status", id="status-500"),
    pytest.param(Script(error_status=429), "upstream_status", id="status-429"),
    pytest.param(Script(fail_after=0), "upstream_protocol", id="broken-at-0"),
    pytest.param(Script(fail_after=3), "upstream_protocol", id="broken-at-3"),
    pytest.param(Script(error_after=0), "upstream_error", id="error-object"),
    pytest.param(Script(truncate_after=3), "upstream_protocol", id="truncated"),
    pytest.param(Script(garbage_after=0), "upstream_protocol", id="not-json"),
    pytest.param(Script(stall_after=1), "upstream_connection", id="silent"),
]


@pytest.mark.parametrize(("script", "code"), FAULTS)
async def test_only_upstream_error_escapes(
    upstream: FakeUpstream, script: Script, code: str
) -> None:
    upstream.script = script
    settings = openai_settings(upstream.base_url, llm_timeout_s=SILENCE_TIMEOUT_S)
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
    # A silence is noticed by chatsrv itself: there is no cause to keep.
    silent = script.stall_after is not None
    assert (
        escaped.__cause__ is not None or code in ("upstream_error", "upstream_protocol") or silent
    )


async def test_emit_failure_propagates_and_drops_the_upstream(
    provider: Provider, upstream: FakeUpstream
) -> None:
    # The engine's emit is a channel's send_nowait: its exceptions are the engine's, not ours.
    upstream.script = Script(tokens=TOKENS, gated=True)
    upstream.release(len(TOKENS))
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
    assert deltas == alone


async def test_demo_is_paced(autojump_clock: Any) -> None:
    times: list[float] = []
    async with open_provider(demo_settings(0.05)) as demo:
        start = trio.current_time()
        with trio.fail_after(60):
            await demo.generate(prompt_saying("pace"), lambda _: times.append(trio.current_time()))
    assert times == pytest.approx([start + 0.05 * (i + 1) for i in range(len(times))])


async def test_demo_is_cancellable(autojump_clock: Any) -> None:
    deltas: list[str] = []
    async with open_provider(demo_settings(0.05)) as demo:
        with trio.move_on_after(0.05 * 5.5) as scope:
            await demo.generate(prompt_saying("cancel me"), deltas.append)
    assert scope.cancelled_caught
    assert len(deltas) == 5

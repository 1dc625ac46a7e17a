"""What the browser tests of the chat page (and ``tests/page/screenshot.py``) stand on: a real
``python -m chatsrv serve --port 0`` subprocess with the demo model, its database and journal in
a directory of the test's own; Debian's chromium driven by Playwright's sync API (never a browser
Playwright downloads); the page wrapped in the names of its DOM contract; and a plain HTTP client
of the API, to check what the server stored.

Everything here is synchronous, with no pytest in it: Playwright's sync API must not run inside
a Trio (or asyncio) loop, so the page tests are plain pytest functions, and the server they talk
to is another process. Its stdout and stderr are read by threads as they arrive; its stderr is
its log, checked with ``tests.processes.log_problems`` once it has exited. Every wait has a time
limit and waits for something observed: a line on stdout, an attribute in the DOM, a row's status.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from httpx_sse import EventSource
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    Request,
    Response,
    expect,
)
from playwright.sync_api import Error as PlaywrightError

from tests.processes import chatsrv_environment, log_problems

# Debian's package; elsewhere, any Chromium named by CHATSRV_TEST_CHROMIUM (README, "Two commands").
CHROMIUM = Path(os.environ.get("CHATSRV_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    # As root chromium refuses to start with its sandbox.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

# Time limits, in seconds (Playwright's are in milliseconds: ``ms``).
START_S = 30.0  # a chatsrv subprocess, until it listens
EXIT_S = 30.0  # a chatsrv subprocess, from SIGTERM until it and its pipes are gone
ACTION_S = 15.0  # a Playwright action or expectation unless a test says otherwise
REPLY_S = 40.0  # a whole demo reply (~40-100 tokens), at the slowest pace a test uses


def ms(seconds: float) -> float:
    return seconds * 1000


def collapse(text: str) -> str:
    """``text`` with every run of whitespace one space and none at either end: the rendered text
    of a reply (``innerText`` of its markdown) compares equal to its stored content this way."""
    return " ".join(text.split())


# --- a chatsrv subprocess -----------------------------------------------------------------------


class Output:
    """What a process writes to one pipe, read by a thread of its own as it arrives."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self._chunks: list[bytes] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(pipe,), name=name, daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := os.read(pipe.fileno(), 65536):
                with self._changed:
                    self._chunks.append(chunk)
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Until ``pattern`` occurs in the output; its match. Fails if the pipe ends first, or
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (found := re.search(pattern, self.text())):
                assert not self._ended, f"the pipe ended without {pattern!r}"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {pattern!r} within {timeout} s"
                self._changed.wait(remaining)
        return found

    def join(self, timeout: float) -> None:
        """Until the pipe's end of file (every process holding its write end has exited)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._thread.name}: no end of file in {timeout} s"


@dataclass
class Chatsrv:
    """A ``python -m chatsrv serve`` subprocess in a session of its own."""

    process: subprocess.Popen[bytes]
    stdout: Output
    stderr: Output
    env: dict[str, str]
    url: str = ""
    killed: bool = False  # by ``kill``: its exit code is SIGKILL's, as the test meant

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        """Everything it wrote to stderr so far: its log."""
        return self.stderr.text()

    def api(self, key: str | None = None) -> Api:
        return Api(self.url, key)

    def terminate(self, timeout: float = EXIT_S) -> int:
        """SIGTERM (``chatsrv serve`` drains, then exits), until it and its pipes are gone; its
        exit code. Killed, and a failure, if it takes longer than ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"chatsrv did not exit within {timeout} s of SIGTERM") from None
        self.stdout.join(timeout)
        self.stderr.join(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL its whole session, as a crash or the OOM killer would, and reap it."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(EXIT_S)
        self.stdout.join(EXIT_S)
        self.stderr.join(EXIT_S)


def chatsrv_env(directory: Path, **settings: str) -> dict[str, str]:
    """The environment of a chatsrv of the page tests: the demo model at ~80 tokens of 50 ms,
    SQLite and the journal in ``directory``, and ``settings`` (``CHATSRV_<NAME>``) over them."""
    defaults = {
        "llm_provider": "demo",
        "demo_token_interval_s": "0.05",
        "database_url": f"sqlite:///{directory / 'chatsrv.db'}",
        "journal_dir": str(directory / "chatsrv-journal"),
    }
    return chatsrv_environment(**(defaults | settings))


def start_chatsrv(env: dict[str, str], cwd: Path, port: int = 0) -> Chatsrv:
    """Start ``python -m chatsrv serve --port <port>`` on loopback (port 0: the kernel picks
    one); return once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsrv", "serve", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    server = Chatsrv(
        process,
        Output(process.stdout, f"chatsrv {process.pid} stdout"),
        Output(process.stderr, f"chatsrv {process.pid} stderr"),
        env,
    )
    try:
        found = server.stdout.wait_for(r"serving on (http://[\d.]+:\d+)", START_S)
    except AssertionError as error:
        server.kill()
        raise AssertionError(f"chatsrv did not start: {error}\n{server.log()}") from None
    server.url = found.group(1)
    return server


def create_key(env: dict[str, str], cwd: Path, user: str) -> str:
    """``python -m chatsrv keys create --user <user>``: the key (its last line of stdout)."""
    run = subprocess.run(
        [sys.executable, "-m", "chatsrv", "keys", "create", "--user", user],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=START_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    problems = log_problems(run.stderr)
    assert not problems, "\n".join(problems)
    return run.stdout.strip().splitlines()[-1]


# --- the HTTP API, to check what the server stored -----------------------------------------------


class Api:
    """A synchronous client of chatsrv's v1 API."""

    def __init__(self, url: str, key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        request = response.request
        assert response.is_success, f"{request.url}: {response.status_code} {response.text}"
        return response.json()

    def message(self, message_id: str) -> dict[str, Any]:
        message: dict[str, Any] = self._json(self.http.get(f"/v1/messages/{message_id}"))
        return message

    def turns(self) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = self._json(self.http.get("/v1/turns"))["turns"]
        return turns

    def new_conversation(self, title: str | None = None) -> str:
        body = {"title": title} if title is not None else {}
        return str(self._json(self.http.post("/v1/conversations", json=body))["id"])

    def wait_final(self, message_id: str, timeout: float = REPLY_S) -> dict[str, Any]:
        """The message once its status is no longer ``streaming`` (polled, within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (message := self.message(message_id))["status"] == "streaming":
            assert time.monotonic() < deadline, f"still streaming after {timeout} s: {message}"
            time.sleep(0.1)
        return message

    def stopped_reply(self, conversation_id: str, content: str, min_chars: int) -> dict[str, Any]:
        """Send ``content``, stop the reply (``POST .../cancel``) once ``min_chars`` of it have
        arrived, and read its stream to ``done``: the stored reply, ``cancelled``."""
        received = ""
        message_id = ""
        cancelled: dict[str, Any] | None = None
        with self.http.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content}
        ) as response:
            assert response.status_code == 200, response.read()
            for event in EventSource(response).iter_sse():
                if event.event == "start":
                    message_id = event.json()["message_id"]
                elif event.event == "delta":
                    received += event.json()["content"]
                    if cancelled is None and len(received) >= min_chars:
                        cancelled = self._json(self.http.post(f"/v1/messages/{message_id}/cancel"))
                elif event.event == "done":
                    break
        assert cancelled is not None, f"the reply ended before {min_chars} characters: {received!r}"
        assert cancelled["status"] == "cancelled", cancelled
        assert cancelled["content"] == received, (cancelled, received)
        return cancelled


# --- the browser and the page -------------------------------------------------------------------


def launch_browser(playwright: Playwright) -> Browser:
    """Debian's chromium (or CHATSRV_TEST_CHROMIUM's), headless; never a browser of Playwright's
    own."""
    assert CHROMIUM.exists(), (
        f"no {CHROMIUM}: the page tests drive Debian's chromium (apt-get install chromium; "
        ".ci/run installs it), or the Chromium that CHATSRV_TEST_CHROMIUM names"
    )
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )


@dataclass
class PageWatch:
    """What a page said while a test drove it: console messages, uncaught errors (``pageerror``:
    exceptions and unhandled rejections), failed requests and error responses, and the API
    requests it made (method, URL, headers)."""

    name: str
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", self._on_error)
        page.on("request", self._on_request)
        page.on("requestfailed", self._on_failed)
        page.on("response", self._on_response)
        page.on("crash", lambda _: self.errors.append("the page crashed"))

    def _on_console(self, message: ConsoleMessage) -> None:
        where = message.location
        self.console.append(
            f"console.{message.type}: {message.text}"
            f"  ({where.get('url')}:{where.get('lineNumber')})"
        )

    def _on_error(self, error: PlaywrightError) -> None:
        self.errors.append(error.stack or error.message)

    def _on_request(self, request: Request) -> None:
        self.requests.append((request.method, request.url, dict(request.headers)))

    def _on_failed(self, request: Request) -> None:
        self.network.append(f"failed: {request.method} {request.url}: {request.failure}")

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.network.append(f"{response.status}: {response.request.method} {response.url}")

    def report(self) -> str:
        lines = [f"--- page {self.name}: uncaught errors"]
        lines += self.errors or ["(none)"]
        lines += [f"--- page {self.name}: console"] + (self.console or ["(none)"])
        lines += [f"--- page {self.name}: failed requests, error responses"]
        lines += self.network or ["(none)"]
        return "\n".join(lines)


_ASSISTANT = 'article.message[data-role="assistant"]'

# The newest assistant article's data-id once it has one (from the stream's start event), and
# its content has at least ``minChars`` characters while its data-status is ``status`` (any
# status when null).
_NEWEST_REPLY = """([minChars, status]) => {
    const articles = document.querySelectorAll('article.message[data-role="assistant"]');
    const article = articles[articles.length - 1];
    if (!article || !article.dataset.id) return null;
    if (status !== null && article.dataset.status !== status) return null;
    const content = article.querySelector(".content");
    return content && content.innerText.length >= minChars ? article.dataset.id : null;
}"""


class ChatPage:
    """The chat page, in the names of its DOM contract."""

    def __init__(self, page: Page, watch: PageWatch) -> None:
        self.page = page
        self.watch = watch

    @property
    def body(self) -> Locator:
        return self.page.locator("body")

    @property
    def input(self) -> Locator:
        return self.page.locator("#input")

    @property
    def stop_button(self) -> Locator:
        return self.page.locator("#stop")

    @property
    def key_dialog(self) -> Locator:
        return self.page.locator("#key-dialog")

    @property
    def conversations(self) -> Locator:
        return self.page.locator('nav[aria-label="Conversations"] #conversations > li')

    def ready(self, timeout: float = ACTION_S) -> None:
        """Until the page has loaded its conversation list."""
        expect(self.body).to_have_attribute("data-ready", "true", timeout=ms(timeout))

    def send(self, text: str) -> None:
        """Type ``text`` into the composer and press Enter."""
        self.input.fill(text)
        self.input.press("Enter")

    def article(self, message_id: str) -> Locator:
        return self.page.locator(f'article.message[data-id="{message_id}"]')

    def assistants(self) -> Locator:
        return self.page.locator(_ASSISTANT)

    def users(self) -> Locator:
        return self.page.locator('article.message[data-role="user"]')

    def newest_reply(
        self, *, min_chars: int = 0, status: str | None = None, timeout: float = REPLY_S
    ) -> str:
        """Until the newest assistant article has a data-id, ``min_chars`` characters of text
        and (when given) data-status ``status``; its data-id."""
        handle = self.page.wait_for_function(
            _NEWEST_REPLY, arg=[min_chars, status], timeout=ms(timeout), polling=50
        )
        return str(handle.json_value())

    def wait_status(self, message_id: str, status: str, timeout: float = REPLY_S) -> None:
        expect(self.article(message_id)).to_have_attribute(
            "data-status", status, timeout=ms(timeout)
        )

    def text(self, message_id: str) -> str:
        """The rendered text of a message, whitespace collapsed."""
        return collapse(self.article(message_id).locator(".content").inner_text())

    def reply_entry(self, message_id: str, timeout: float = ACTION_S) -> dict[str, Any]:
        """Until the page keeps ``sessionStorage["chatsrv.reply.<id>"]``; its value."""
        handle = self.page.wait_for_function(
            "(key) => sessionStorage.getItem(key)",
            arg=f"chatsrv.reply.{message_id}",
            timeout=ms(timeout),
        )
        entry: dict[str, Any] = json.loads(str(handle.json_value()))
        return entry

    def stream_requests(self, message_id: str) -> list[tuple[str, dict[str, str]]]:
        """The requests the page made for ``GET /v1/messages/<id>/events``: URL, headers."""
        return [
            (url, headers)
            for method, url, headers in self.watch.requests
            if method == "GET" and f"/v1/messages/{message_id}/events" in url
        ]


class Harness:
    """The servers and pages of one test (or of the screenshot), all in ``directory``: each
    chatsrv it starts uses the same database and journal there, so a restarted server serves
    what the first one stored. ``close`` ends them all and says what went wrong."""

    def __init__(self, browser: Browser, directory: Path) -> None:
        self.browser = browser
        self.directory = directory
        self.servers: list[Chatsrv] = []
        self.contexts: list[BrowserContext] = []
        self.watches: list[PageWatch] = []

    def env(self, **settings: str) -> dict[str, str]:
        return chatsrv_env(self.directory, **settings)

    def start_chatsrv(self, port: int = 0, /, **settings: str) -> Chatsrv:
        """A chatsrv on ``port`` (0: one the kernel picks) with ``settings``, once it listens."""
        server = start_chatsrv(self.env(**settings), self.directory, port)
        self.servers.append(server)
        return server

    def create_key(self, user: str, **settings: str) -> str:
        return create_key(self.env(**settings), self.directory, user)

    def open_page(
        self, server: Chatsrv, fragment: str = "", *, width: int = 1280, height: int = 800
    ) -> ChatPage:
        """The page of ``server`` (``GET /`` + ``fragment``), in a browser context of its own."""
        context = self.browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(ms(ACTION_S))
        self.contexts.append(context)
        page = context.new_page()
        watch = PageWatch(f"{len(self.watches) + 1} of {server.url}")
        watch.attach(page)
        self.watches.append(watch)
        page.goto(server.url + "/" + fragment)
        return ChatPage(page, watch)

    def report(self) -> str:
        """Every page's console and errors and every server's log, for a failure's report."""
        parts = [watch.report() for watch in self.watches]
        for number, server in enumerate(self.servers, 1):
            parts.append(f"--- chatsrv {number} ({server.url}) log\n{server.log()}")
        return "\n".join(parts)

    def close(self) -> list[str]:
        """Close the pages, SIGTERM the servers; what went wrong: the pages' uncaught errors, a
        server's exit code or its log's errors and tracebacks."""
        problems: list[str] = []
        for context in self.contexts:
            with contextlib.suppress(PlaywrightError):
                context.close()
        for watch in self.watches:
            problems += [f"page {watch.name}: uncaught: {error}" for error in watch.errors]
        for server in self.servers:
            try:
                code = server.terminate()
            except AssertionError as error:
                problems.append(str(error))
                continue
            if code != 0 and not server.killed:
                problems.append(f"chatsrv {server.url} exited with {code}")
            problems += [f"chatsrv {server.url}: {p}" for p in log_problems(server.log())]
        return problems

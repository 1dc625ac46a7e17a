"""The chat page (``GET /``) in Debian's chromium, against a real ``chatsrv serve`` subprocess with
the demo model: a reply renders as stored; a reload mid-reply resumes it with no gap and no
repeat; closing the page, Stop and Continue end and grow the stored reply as the page shows it; a
restarted server's verdict on a reply reaches the page without a reload, after a drain (which
sends it) and after a crash (which breaks the stream: the page reconnects); with keys on the page
asks for one. Plain synchronous tests: Playwright's sync API must not run in a Trio loop."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.page.harness import ACTION_S, REPLY_S, ChatPage, Harness, collapse, ms


def assert_shows_stored(chat: ChatPage, message: dict[str, object]) -> None:
    """The page shows ``message``'s stored content (whitespace collapsed), no more, no less."""
    assert chat.text(str(message["id"])) == collapse(str(message["content"])), message


def test_a_full_reply_renders_as_stored(harness: Harness) -> None:
    server = harness.start_chatsrv()
    chat = harness.open_page(server)
    chat.ready()
    typed = "Tell me about Trio nurseries and cancel scopes"

    chat.send(typed)
    reply_id = chat.newest_reply()
    chat.wait_status(reply_id, "complete")

    with server.api() as api:
        stored = api.message(reply_id)
    assert (stored["status"], stored["stop_reason"]) == ("complete", "stop")
    assert_shows_stored(chat, stored)
    question = chat.article(str(stored["parent_id"]))
    expect(question).to_have_attribute("data-role", "user")
    assert collapse(question.locator(".content").inner_text()) == typed
    expect(chat.input).to_be_focused()
    # Sending with no conversation open made one, and opened it: the list and the address.
    conversation_id = stored["conversation_id"]
    expect(chat.conversations).to_have_count(1)
    expect(chat.conversations.first).to_have_attribute("data-id", conversation_id)
    assert chat.page.evaluate("location.hash") == f"#c={conversation_id}"


def test_a_reload_mid_reply_resumes_it_with_no_gap_and_no_repeat(harness: Harness) -> None:
    # A token every 100 ms (a reply of 4-10 s). The page asks for its replies to wait 10 s for
    # it to come back (on_disconnect), over the server's default "cancel".
    server = harness.start_chatsrv(demo_token_interval_s="0.1")
    chat = harness.open_page(server)
    chat.ready()
    chat.send("How does a browser resume an event stream after a reload")
    reply_id = chat.newest_reply(min_chars=20, status="streaming")
    saved = chat.reply_entry(reply_id)
    assert isinstance(saved["offset"], int) and saved["offset"] > 0, saved
    assert isinstance(saved["text"], str) and saved["text"], saved

    chat.page.reload()
    with server.api() as api:
        # It came back to a reply still running: a resume, not the replay of a finished one.
        running = [turn["message_id"] for turn in api.turns()]
        assert reply_id in running, running
        chat.ready()
        chat.wait_status(reply_id, "streaming", timeout=ACTION_S)
        chat.wait_status(reply_id, "complete")
        stored = api.message(reply_id)

    assert (stored["status"], stored["stop_reason"]) == ("complete", "stop")
    assert_shows_stored(chat, stored)
    # It asked for the rest after what it had shown: Last-Event-ID (header or query).
    resumed = [
        (url, headers)
        for url, headers in chat.stream_requests(reply_id)
        if "last-event-id" in headers or "last_event_id=" in url
    ]
    assert resumed, chat.stream_requests(reply_id)
    url, headers = resumed[-1]
    offset = int(headers.get("last-event-id") or url.split("last_event_id=")[1].split("&")[0])
    assert offset > 0, resumed


def test_closing_the_page_mid_reply_leaves_it_interrupted_with_what_it_showed(
    harness: Harness,
) -> None:
    # A token every 400 ms: the reply (16-40 s) outlasts the 10 s the page's replies wait for
    # it to come back.
    server = harness.start_chatsrv(demo_token_interval_s="0.4")
    chat = harness.open_page(server)
    chat.ready()
    chat.send("What happens to a reply when the reader goes away")
    reply_id = chat.newest_reply(min_chars=20, status="streaming")
    shown = chat.text(reply_id)

    chat.page.close()

    with server.api() as api:
        stored = api.wait_final(reply_id, timeout=30)
    assert (stored["status"], stored["stop_reason"]) == ("interrupted", "resume_grace_expired")
    assert collapse(stored["content"]).startswith(shown), (shown, stored)


def test_stop_cancels_the_reply_and_keeps_what_it_showed(harness: Harness) -> None:
    server = harness.start_chatsrv(demo_token_interval_s="0.1")
    chat = harness.open_page(server)
    chat.ready()
    chat.send("Why should cancellation be as well tested as success")
    reply_id = chat.newest_reply(min_chars=20, status="streaming")
    expect(chat.stop_button).to_be_visible()

    chat.stop_button.click()

    chat.wait_status(reply_id, "cancelled", timeout=ACTION_S)
    badge = chat.article(reply_id).locator(".badge")
    expect(badge).to_have_attribute("title", "user_cancelled")
    expect(badge).to_have_text("cancelled")
    expect(chat.article(reply_id).locator("button.continue")).to_be_visible()
    expect(chat.stop_button).to_be_hidden()
    with server.api() as api:
        stored = api.message(reply_id)
    assert (stored["status"], stored["stop_reason"]) == ("cancelled", "user_cancelled")
    assert_shows_stored(chat, stored)


def test_continue_grows_the_same_reply_to_complete(harness: Harness) -> None:
    server = harness.start_chatsrv()
    with server.api() as api:
        conversation_id = api.new_conversation("continuing")
        stopped = api.stopped_reply(
            conversation_id, "Explain how a stopped reply goes on", min_chars=20
        )
        reply_id = str(stopped["id"])
        chat = harness.open_page(server, f"#c={conversation_id}")
        chat.ready()
        reply = chat.article(reply_id)
        expect(reply).to_have_attribute("data-status", "cancelled")
        expect(reply.locator(".badge")).to_have_attribute("title", "user_cancelled")
        assert_shows_stored(chat, stopped)

        reply.locator("button.continue").click()

        chat.wait_status(reply_id, "streaming", timeout=ACTION_S)
        chat.wait_status(reply_id, "complete")
        stored = api.message(reply_id)

    assert (stored["status"], stored["stop_reason"]) == ("complete", "stop")
    assert stored["content"].startswith(stopped["content"])
    assert len(stored["content"]) > len(stopped["content"])
    assert_shows_stored(chat, stored)
    expect(chat.assistants()).to_have_count(1)  # the same article went on, no second one
    expect(reply.locator(".badge")).to_have_count(0)
    expect(reply.locator("button.continue")).to_have_count(0)


def test_a_reply_cut_by_a_server_restart_shows_its_verdict_without_a_reload(
    harness: Harness,
) -> None:
    # A token every 100 ms: the reply is still running when the 0.5 s grace ends.
    settings = {"demo_token_interval_s": "0.1", "shutdown_grace_s": "0.5"}
    first = harness.start_chatsrv(**settings)
    chat = harness.open_page(server=first)
    chat.ready()
    loads: list[str] = []  # documents loaded from now on (a replaceState of the hash is none)
    chat.page.on("domcontentloaded", lambda page: loads.append(page.url))
    chat.send("What should a client see when the server restarts")
    reply_id = chat.newest_reply(min_chars=20, status="streaming")

    assert first.terminate() == 0, first.log()  # SIGTERM: drains, then exits
    # The same port and database: the page's own origin comes back.
    second = harness.start_chatsrv(first.port, **settings)

    chat.wait_status(reply_id, "interrupted", timeout=REPLY_S)
    badge = chat.article(reply_id).locator(".badge")
    expect(badge).to_have_attribute("title", "server_shutdown")
    expect(badge).to_have_text("interrupted")
    with second.api() as api:
        stored = api.message(reply_id)
    assert (stored["status"], stored["stop_reason"]) == ("interrupted", "server_shutdown")
    assert_shows_stored(chat, stored)
    assert not loads, loads  # the page was never reloaded


def test_a_reply_cut_by_a_crash_is_reconnected_to_and_shows_the_swept_verdict(
    harness: Harness,
) -> None:
    # Not a drain this time: SIGKILL, so the page's stream breaks with no `done`. The restarted
    # server sweeps the reply once the dead process's 2 s lease has run out.
    settings = {
        "demo_token_interval_s": "0.1",
        "checkpoint_interval_s": "0.5",
        "lease_s": "2",
        "sweep_interval_s": "0.5",
    }
    first = harness.start_chatsrv(**settings)
    chat = harness.open_page(first)
    chat.ready()
    loads: list[str] = []
    chat.page.on("domcontentloaded", lambda page: loads.append(page.url))
    chat.send("What should a client see when the server crashes")
    reply_id = chat.newest_reply(min_chars=40, status="streaming")

    first.kill()
    asked = len(chat.stream_requests(reply_id))
    second = harness.start_chatsrv(first.port, **settings)

    chat.wait_status(reply_id, "interrupted", timeout=REPLY_S)
    badge = chat.article(reply_id).locator(".badge")
    expect(badge).to_have_attribute("title", "server_crash")
    with second.api() as api:
        stored = api.message(reply_id)
    assert (stored["status"], stored["stop_reason"]) == ("interrupted", "server_crash")
    assert_shows_stored(chat, stored)  # what the server kept, up to its last checkpoint
    assert len(chat.stream_requests(reply_id)) > asked  # it reconnected to the reply's stream
    assert not loads, loads  # the page was never reloaded


def test_with_keys_on_the_page_asks_for_one_and_keeps_it(harness: Harness) -> None:
    key = harness.create_key("alice", auth="keys")
    server = harness.start_chatsrv(auth="keys")
    chat = harness.open_page(server)
    dialog = chat.key_dialog
    expect(dialog).to_be_visible()

    # A wrong key is refused, and the dialog comes back.
    wrong = "csk_000000000000_" + "A" * 43
    with chat.page.expect_response(
        lambda response: (
            response.status == 401
            and response.request.headers.get("authorization") == f"Bearer {wrong}"
        ),
        timeout=ms(ACTION_S),
    ):
        dialog.get_by_label("API key").fill(wrong)
        dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_visible()

    dialog.get_by_label("API key").fill(key)
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    chat.ready()
    expect(chat.conversations).to_have_count(0)  # alice's list: empty
    assert chat.page.evaluate("localStorage.getItem('chatsrv.key')") == key

    chat.send("Which key am I using")
    reply_id = chat.newest_reply()
    chat.wait_status(reply_id, "complete")
    with server.api(key) as api:
        stored = api.message(reply_id)
    assert stored["status"] == "complete"
    assert_shows_stored(chat, stored)

    # The key kept: a reload asks for none.
    chat.page.reload()
    chat.ready()
    expect(chat.conversations).to_have_count(1)
    expect(dialog).to_be_hidden()


HOSTILE = """Some <b>bold</b> claims & <img src=x onerror="window.pwned=1"> here.

```html
<script>window.pwned = 2</script>
```

- one `<i>code</i>`
- **two**

1. first
2. second"""


def test_replies_render_a_little_markdown_and_never_html_from_the_model(
    harness: Harness,
) -> None:
    server = harness.start_chatsrv()
    chat = harness.open_page(server)
    chat.ready()
    shape = chat.page.evaluate(
        """(text) => {
            const box = document.createElement("div");
            box.append(window.chatsrvRender(text));
            document.body.append(box);
            const tags = [...box.querySelectorAll("*")].map((node) => node.tagName.toLowerCase());
            return {
                tags: [...new Set(tags)].sort(),
                text: box.textContent,
                code: box.querySelector("pre code")?.textContent,
                items: [...box.querySelectorAll("li")].map((li) => li.textContent),
            };
        }""",
        HOSTILE,
    )
    # Only the page's own elements: nothing the text spelt as HTML became an element.
    assert shape["tags"] == ["code", "li", "ol", "p", "pre", "strong", "ul"], shape
    assert "<img src=x onerror=" in shape["text"] and "<b>bold</b>" in shape["text"]
    assert shape["code"] == "<script>window.pwned = 2</script>"
    assert shape["items"] == ["one <i>code</i>", "two", "first", "second"]
    assert chat.page.evaluate("window.pwned") is None


def test_the_sidebar_makes_opens_and_deletes_conversations_with_the_keyboard(
    harness: Harness,
) -> None:
    server = harness.start_chatsrv(demo_token_interval_s="0")
    chat = harness.open_page(server)
    chat.ready()
    # Shift+Enter is a new line, Enter sends: one message of two lines.
    chat.input.fill("first line")
    chat.input.press("Shift+Enter")
    chat.input.type("second line")
    chat.input.press("Enter")
    chat.wait_status(chat.newest_reply(), "complete")
    expect(chat.users()).to_have_count(1)
    assert chat.users().first.locator(".content").inner_text() == "first line\nsecond line"
    first = chat.page.evaluate("location.hash")

    chat.page.locator("#new").focus()
    chat.page.keyboard.press("Enter")  # New, from the keyboard
    expect(chat.conversations).to_have_count(2)
    expect(chat.page.locator("article.message")).to_have_count(0)
    newest = chat.conversations.first
    expect(newest).to_have_attribute("aria-current", "true")  # newest first, and open
    expect(newest.locator(".open")).to_have_text("New conversation")

    # Deleting asks first: dismissed, nothing goes; accepted, it goes with its messages.
    older = chat.conversations.nth(1)
    older_id = older.get_attribute("data-id")
    chat.page.once("dialog", lambda dialog: dialog.dismiss())
    older.locator(".delete").click()
    expect(chat.conversations).to_have_count(2)
    chat.page.once("dialog", lambda dialog: dialog.accept())
    older.locator(".delete").click()
    expect(chat.conversations).to_have_count(1)
    assert first == f"#c={older_id}"
    with server.api() as api:
        response = api.http.get(f"/v1/conversations/{older_id}")
    assert response.status_code == 404

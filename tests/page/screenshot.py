"""A screenshot of the chat page for the docs: ``python -m tests.page.screenshot docs/page.png``.

Starts a chatsrv (the demo model, in a temporary directory), opens the page at 1100x700 in
Debian's chromium, sends two messages, lets the first reply complete and stops the second
midway (so that its badge and Continue show), and saves the page to the path given. Fails (exit
status 1) if the page threw or the server logged an error."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.page.harness import Harness, launch_browser

MESSAGES = (
    "What does chatsrv promise about a reply that has started streaming",
    "How does a browser come back to a reply after a reload",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.page.screenshot", description=__doc__)
    parser.add_argument("path", type=Path, help="where to write the PNG")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="chatsrv-screenshot-") as directory,
        sync_playwright() as playwright,
    ):
        browser = launch_browser(playwright)
        harness = Harness(browser, Path(directory))
        try:
            server = harness.start_chatsrv()
            chat = harness.open_page(server, width=1100, height=700)
            chat.ready()
            for sent, message in enumerate(MESSAGES, 1):
                chat.send(message)
                expect(chat.assistants()).to_have_count(sent)
                if sent < len(MESSAGES):
                    chat.wait_status(chat.newest_reply(min_chars=1), "complete")
                else:
                    reply_id = chat.newest_reply(min_chars=120, status="streaming")
                    chat.stop_button.click()
                    chat.wait_status(reply_id, "cancelled")
            args.path.parent.mkdir(parents=True, exist_ok=True)
            chat.page.screenshot(path=args.path)
        except BaseException:
            print(harness.report(), file=sys.stderr)
            raise
        finally:
            problems = harness.close()
            browser.close()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

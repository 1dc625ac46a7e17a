"""The page tests' fixtures: one headless Debian chromium per module, and per test a ``Harness``
(its chatsrv subprocesses and pages, in the test's tmp_path). At the end of a test its pages are
closed and its servers get SIGTERM; a page's uncaught error, a server's unclean exit or an error
or traceback in its log fails the test there. A failed test's report shows every page's console,
uncaught errors and failed requests, and every server's log."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.page.harness import Harness, launch_browser

_HARNESS = pytest.StashKey[Harness]()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def harness(browser: Browser, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    harness = Harness(browser, tmp_path)
    request.node.stash[_HARNESS] = harness
    try:
        yield harness
    finally:
        problems = harness.close()
    assert not problems, "\n".join(problems) + "\n" + harness.report()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    harness = item.stash.get(_HARNESS, None)
    if harness is not None and report.when == "call" and report.failed:
        report.sections.append(("the pages and servers", harness.report()))
    return report

"""``GET /metrics``: each figure changes as real turns run, end, fail, checkpoint, retry and go
through the journal (one process); with two hypercorn workers and ``PROMETHEUS_MULTIPROC_DIR``,
every scrape answers for the whole server; ``CHATSRV_METRICS`` says who may read it.

The in-process servers of one test run share the process's figures, so a test compares each
figure before and after what it does."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import Hypercorn, ProcessLog, chatsrv_environment
from tests.server import ApiClient, Chatsrv, StartChatsrv


class Figures:
    """One scrape of ``/metrics``: ``figures["name", label=value...]``, 0 when absent."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: httpx.AsyncClient) -> Figures:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Figures(response.text)


def changed(before: Figures, after: Figures, name: str, **labels: str) -> float:
    return after(name, **labels) - before(name, **labels)


async def test_figures_of_turns_and_requests_change_as_turns_run(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    conversation_id = await chatsrv.new_conversation()
    before = await scrape(chatsrv.client)
    with trio.fail_after(30):
        upstream.script.stall_after = 1
        async with trio.open_nursery() as nursery:
            stream = await chatsrv.stream_until(nursery, conversation_id)
            during = await scrape(chatsrv.client)
            await chatsrv.client.post(f"/v1/messages/{stream.message_id}/cancel")
        upstream.script.stall_after = None
        complete = await chatsrv.stream(conversation_id)
        upstream.script.error_status = 500
        failed = await chatsrv.stream(conversation_id)
        upstream.script.error_status = None
        await chatsrv.client.get(f"/v1/conversations/{conversation_id}/nope")
    after = await scrape(chatsrv.client)

    assert complete.done is not None and failed.done is not None
    assert changed(before, during, "chatsrv_turns_running") == 1
    assert changed(before, during, "chatsrv_sse_clients") == 1
    assert changed(before, after, "chatsrv_turns_running") == 0
    assert changed(before, after, "chatsrv_sse_clients") == 0
    ended = "chatsrv_turns_ended_total"
    assert changed(before, after, ended, status="complete", stop_reason="stop") == 1
    assert changed(before, after, ended, status="cancelled", stop_reason="user_cancelled") == 1
    assert changed(before, after, ended, status="failed", stop_reason="upstream_error") == 1
    errors = "chatsrv_upstream_errors_total"
    assert changed(before, after, errors, code="upstream_status") == 1
    # Two turns had a first token (the failed one had none); three were saved.
    assert changed(before, after, "chatsrv_first_token_seconds_count") == 2
    assert changed(before, after, "chatsrv_turn_save_seconds_count") == 3
    route = "/v1/conversations/<conversation_id>/messages"
    assert changed(before, after, "chatsrv_requests_total", route=route, status="200") == 3
    assert changed(before, after, "chatsrv_requests_total", route="unmatched", status="404") == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_figures_of_checkpoints_retries_and_the_journal(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str
) -> None:
    chatsrv = await start_chatsrv(
        checkpoint_interval_s=0.05, persist_retry_s=1.0, sweep_interval_s=0.2
    )
    upstream.script.tokens = [f"t{i} " for i in range(6)]
    upstream.script.interval_s = 0.05
    conversation_id = await chatsrv.new_conversation()
    failing = {"commits": 2}

    def locked_final_commits(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The final commit sets the status; a checkpoint keeps it 'streaming'.
        final = statement.lstrip().upper().startswith("UPDATE MESSAGES") and "owner=" in statement
        if final and failing["commits"]:
            failing["commits"] -= 1
            raise sqlite3.OperationalError("database is locked")

    before = await scrape(chatsrv.client)
    with trio.fail_after(30), chatsrv.before_each_statement(locked_final_commits):
        retried = await chatsrv.stream(conversation_id)
    middle = await scrape(chatsrv.client)
    failing["commits"] = 10_000  # every final commit fails: the reply goes to the journal
    with trio.fail_after(30), chatsrv.before_each_statement(locked_final_commits):
        journaled = await chatsrv.stream(conversation_id)
        journal = await scrape(chatsrv.client)
    with trio.fail_after(30):
        # Replayed by the recovery task (every sweep interval): polled, as a scraper would.
        while (after := await scrape(chatsrv.client))("chatsrv_journal_waiting") > 0:  # noqa: ASYNC110
            await trio.sleep(0.05)

    assert retried.done is not None and journaled.done is not None
    assert changed(before, middle, "chatsrv_checkpoints_total", result="written") > 0
    assert changed(before, middle, "chatsrv_persist_retries_total") == 2
    assert changed(middle, journal, "chatsrv_journal_appends_total") == 1
    assert journal("chatsrv_journal_waiting") == 1
    assert changed(journal, after, "chatsrv_journal_replays_total") == 1
    stored = await chatsrv.message(journaled.message_id)
    assert stored["status"] == "complete"


async def test_who_may_read_the_figures(start_chatsrv: StartChatsrv) -> None:
    public = await start_chatsrv(auth="keys")
    assert (await public.client.get("/metrics")).status_code == 200
    keyed = await start_chatsrv(auth="keys", metrics="keys")
    assert (await keyed.client.get("/metrics")).status_code == 401
    _, key = await keyed.service.store.create_key("prometheus")
    allowed = await keyed.client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert allowed.status_code == 200
    off = await start_chatsrv(metrics="off")
    assert (await off.client.get("/metrics")).status_code == 404
    assert "/metrics" not in (await off.client.get("/openapi.json")).json()["paths"]


async def test_two_workers_answer_for_the_whole_server(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    """Turns are spread over both workers (their owners in GET /v1/turns say so); then every
    scrape, on whichever worker it lands, counts all of them."""
    upstream.script.tokens = [f"w{i} " for i in range(20)]
    upstream.script.interval_s = 0.05
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = chatsrv_environment(
        database_url=postgresql_url,
        llm_base_url=upstream.base_url,
        llm_api_key="test-key",
        journal_dir=str(tmp_path / "journal"),
        log_level="WARNING",
    )
    env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    config = tmp_path / "hypercorn.toml"
    config.write_text(
        'bind = ["127.0.0.1:0"]\nworker_class = "trio"\nworkers = 2\ngraceful_timeout = 2.0\n'
    )
    log = ProcessLog()
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hypercorn", "-c", str(config), "chatsrv.app:create_app()"],
            env=env,
            stderr=-1,
            start_new_session=True,
        )
        assert process.stderr is not None
        server = Hypercorn(process, log)
        nursery.start_soon(log.collect, process.stderr)
        try:
            with trio.fail_after(60):
                url = (await log.wait_for(r"Running on (http://\S+)")).group(1)
                # Both workers listen once each has said so.
                while log.text().count("Running on") < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                owners: set[str] = set()
                streams = 0
                async with trio.open_nursery() as clients:
                    while len(owners) < 2:
                        assert streams < 40, "every stream landed on one worker"
                        streams += 1
                        clients.start_soon(_one_stream, url)
                        await trio.sleep(0.05)
                        async with httpx.AsyncClient(base_url=url) as http:
                            turns = (await http.get("/v1/turns")).json()["turns"]
                        owners |= {turn["owner"] for turn in turns}
                totals = set()
                for _ in range(6):  # each on a new connection: either worker
                    async with httpx.AsyncClient(base_url=url) as http:
                        figures = await scrape(http)
                    totals.add(
                        (
                            figures(
                                "chatsrv_turns_ended_total", status="complete", stop_reason="stop"
                            ),
                            figures("chatsrv_turns_running"),
                        )
                    )
            assert totals == {(streams, 0)}
            process.terminate()
            with trio.fail_after(30):
                await server.exited()
        finally:
            server.kill_all()
    server.log.assert_clean()


async def _one_stream(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        api = ApiClient(http)
        stream = await api.stream(await api.new_conversation())
        assert stream.done is not None and stream.done["status"] == "complete"

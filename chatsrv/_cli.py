"""The ``chatsrv`` command: ``serve``, ``db upgrade`` and ``keys create|list|revoke``.

``serve`` runs hypercorn's trio worker in this process and owns the shutdown: on SIGINT (Ctrl-C)
or SIGTERM the engine drains first — running turns get ``CHATSRV_SHUTDOWN_GRACE_S``, every reply
is committed, connected clients get their ``done`` event — and only then is hypercorn told to
close the connections and run the lifespan shutdown.

``serve --workers N`` (N > 1) runs hypercorn's own master in this process instead, with N trio
workers as child processes that share the listening socket. On SIGINT or SIGTERM the master sets
the workers' shutdown event, and each worker's app starts the same drain the moment it sees it
(``http/_hypercorn.py``); hypercorn's graceful period then runs alongside the drain, so it is set
to outlast it. The checks that refuse to start (keyless on an address other than loopback, a
schema behind) run here, once, before any worker starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.logging import Logger as HypercornLogs
from hypercorn.run import run as hypercorn_run
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.utils import repr_socket_addr
from pydantic import ValidationError

from . import _logs
from ._errors import SchemaMismatch, UnsafeSettings
from ._service import Service
from ._settings import Settings
from .app import create_app
from .http import refuse_keyless
from .store import Store, schema_head

log = logging.getLogger("chatsrv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatsrv", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (CHATSRV_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (CHATSRV_PORT, default 8000)")
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="worker processes (CHATSRV_WORKERS, default 1); more than 1 runs hypercorn's master "
        "here and that many trio workers under it",
    )
    db = commands.add_parser("db", help="the database's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser(
        "upgrade", aliases=["init"], help="make the schema, or apply the migrations it lacks"
    )
    db_commands.add_parser("current", help="print the schema's revision, and this chatsrv's")
    keys = commands.add_parser("keys", help="API keys (CHATSRV_AUTH=keys)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser(
        "create", help="make a key for a user (made if new); the key is printed once"
    )
    create.add_argument("--user", required=True, help="the user's name")
    keys_commands.add_parser("list", help="list the keys (never the keys themselves)")
    revoke = keys_commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("id", help="the key's id, as `chatsrv keys list` shows it")
    args = parser.parse_args(argv)

    overrides = {
        name: value
        for name in ("host", "port", "workers")
        if (value := getattr(args, name, None)) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        for problem in error.errors():
            name = str(problem["loc"][0]) if problem["loc"] else ""
            where = f"--{name}" if name in overrides else f"CHATSRV_{name.upper()}"
            print(f"chatsrv: {where}: {problem['msg']}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            if settings.auth == "off":
                refuse_keyless([f"{settings.host}:{settings.port}"])
            # The schema is made or checked before hypercorn starts, so that a database too old
            # to serve is one line on stderr rather than a failed lifespan's traceback (and, with
            # several workers, before they all race to make it).
            trio.run(_open_database, settings)
            if settings.workers > 1:
                return _serve_workers(settings)
            trio.run(_serve, settings)
            return 0
        return trio.run(partial(_manage, settings, args))
    except (UnsafeSettings, SchemaMismatch) as error:
        print(f"chatsrv: {error.message}", file=sys.stderr)
        return 2


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: chatsrv needs at least 1 worker")
    return count


class _Logs(HypercornLogs):
    """hypercorn's logs as ``chatsrv serve`` writes them: the error log as hypercorn makes it,
    the access log on stderr beside it (not on hypercorn's stdout). hypercorn makes this object
    where it is first used: under ``--workers N`` in each worker, from the config the master
    sent it. CHATSRV_LOG_FORMAT is given to both logs by ``_serve``, or in a worker by the app
    (``worker_loggers``)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        access = logging.getLogger("hypercorn.access")
        access.handlers = [logging.StreamHandler()]
        access.handlers[0].setFormatter(_logs.formatter("text"))
        access.setLevel(logging.INFO)
        access.propagate = False
        self.access_logger = access


def _config(settings: Settings, *, graceful_timeout_s: float) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.graceful_timeout = graceful_timeout_s
    config.logger_class = _Logs
    return config


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    # By the time hypercorn closes connections the engine has drained, so this only bounds
    # requests other than turns.
    config = _config(settings, graceful_timeout_s=5.0)
    _logs.reformat([config.log.error_logger, config.log.access_logger], settings.log_format)
    shutdown_trigger = partial(_drain_on_signal, app.extensions)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=shutdown_trigger)
        )
        print(
            f"chatsrv serving on {binds[0]}  (database {_describe_db(settings)}, "
            f"model {settings.model} via {settings.provider}; Ctrl-C to stop)",
            flush=True,
        )


def _serve_workers(settings: Settings) -> int:
    """hypercorn's master, running ``settings.workers`` trio workers; the exit status."""
    # In a worker, hypercorn's graceful period starts with the drain, not after it: it outlasts
    # the turns' grace and their final commits, so that every client gets its `done` before its
    # connection is closed. It only bounds: a worker with nothing to drain stops at once.
    config = _config(
        settings, graceful_timeout_s=settings.shutdown_grace_s + settings.persist_grace_s + 5.0
    )
    config.worker_class = "trio"
    config.workers = settings.workers
    config.application_path = "chatsrv.app:create_app()"
    # The port is bound here, with hypercorn's own code but as for one worker, and handed to
    # hypercorn as fd:// binds. So it is listening when the line below says so (connections wait
    # in the backlog until a worker takes them), and it is bound without the SO_REUSEPORT that
    # hypercorn sets when it binds for several workers — which would let a second server start
    # on the same port and silently take part of its connections. The workers share the socket.
    sockets = _config(settings, graceful_timeout_s=0.0).create_sockets().insecure_sockets
    for sock in sockets:
        sock.listen(config.backlog)
    binds = [f"http://{repr_socket_addr(sock.family, sock.getsockname())}" for sock in sockets]
    config.bind = [f"fd://{sock.detach()}" for sock in sockets]  # hypercorn closes them
    # The master logs nothing itself: `config.log` is left unmade, so that each worker makes its
    # own from the config it is sent.
    print(
        f"chatsrv serving on {binds[0]}  ({settings.workers} workers, database "
        f"{_describe_db(settings)}, model {settings.model} via {settings.provider}; "
        "Ctrl-C to stop)",
        flush=True,
    )
    with _metrics_directory(), _signals_received() as received:
        status = hypercorn_run(config)
        # hypercorn returns once one worker has exited (and SIGTERMs the others, which keep
        # draining: chatsrv's worker holds SIGTERM until it ends). Outlive them all, so that a
        # supervisor that waits for this process waits for every reply to be saved. (Each
        # worker bounds its own shutdown: the app's stop bound, hypercorn's graceful period.)
        for worker in multiprocessing.active_children():
            worker.join()
        stopped = bool(received() & {signal.SIGINT, signal.SIGTERM})
    if not stopped:
        # Nothing asked it to stop, so a worker failed (its startup, most likely): hypercorn
        # then stops the server but may exit 0 (docs/hypercorn-worker-exit-status.md).
        print("chatsrv: a worker process failed (see its log above): stopped", file=sys.stderr)
        return status or 1
    return status


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """With several workers, ``/metrics`` answers for the whole server only in prometheus-client's
    multiprocess mode (``_metrics``): unless ``PROMETHEUS_MULTIPROC_DIR`` names a directory
    already, one is made for this run, inherited by the workers, and removed after it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="chatsrv-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


@contextlib.contextmanager
def _signals_received() -> Iterator[Callable[[], set[int]]]:
    """The signals this process receives in the block, whoever handles them (hypercorn's master
    installs its own handlers): Python writes each one's number to the wakeup fd."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    received: set[int] = set()

    def read() -> set[int]:
        with contextlib.suppress(BlockingIOError):
            while data := reader.recv(64):
                received.update(data)
        return received

    try:
        yield read
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


async def _drain_on_signal(extensions: dict[str, object]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: draining", signal.Signals(signum).name)
            break
    service = extensions.get("chatsrv")
    if isinstance(service, Service):
        service.engine.drain()
        await service.engine.drained.wait()


async def _open_database(settings: Settings) -> None:
    async with Store.open(
        settings.database_url, timeout_s=settings.db_timeout_s, upgrade=settings.upgrades_schema
    ):
        pass


async def _manage(settings: Settings, args: argparse.Namespace) -> int:
    """The database and key commands; the exit status."""
    async with Store.open(
        settings.database_url,
        timeout_s=settings.db_timeout_s,
        init_schema=args.command != "db",
        upgrade=settings.upgrades_schema,
    ) as store:
        if args.command == "db":
            if args.db_command == "current":
                revision = await store.schema_revision()
                print(f"database at {revision or 'nothing (empty)'}; this chatsrv: {schema_head()}")
                return 0
            applied = await store.upgrade_schema()
            print(f"applied {', '.join(applied)}" if applied else "the schema is up to date")
            return 0
        if args.keys_command == "create":
            record, key = await store.create_key(args.user)
            print(f"key {record['id']} for user {record['user']}: shown this once, keep it safe")
            print(key)
            return 0
        if args.keys_command == "list":
            print(f"{'ID':<14}{'USER':<24}{'CREATED':<34}REVOKED")
            for record in await store.list_keys():
                revoked = record["revoked_at"] or "-"
                print(f"{record['id']:<14}{record['user']:<24}{record['created_at']:<34}{revoked}")
            return 0
        if await store.revoke_key(args.id):
            print(f"revoked key {args.id}")
            return 0
        print(f"chatsrv: no key {args.id} that is not revoked already", file=sys.stderr)
        return 1


def _describe_db(settings: Settings) -> str:
    url = settings.database_url
    if url.startswith("sqlite"):
        return "sqlite " + url.split(":///", 1)[-1]
    return "postgresql " + url.rsplit("@", 1)[-1]

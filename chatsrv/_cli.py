"""The ``chatsrv`` command: ``serve``, ``db upgrade`` and ``keys create|list|revoke``.

``serve`` runs hypercorn's trio worker in this process and owns the shutdown: on SIGINT (Ctrl-C)
or SIGTERM the engine drains first — running turns get ``CHATSRV_SHUTDOWN_GRACE_S``, every reply
is committed, connected clients get their ``done`` event — and only then is hypercorn told to
close the connections and run the lifespan shutdown.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

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
        name: value for name in ("host", "port") if (value := getattr(args, name, None)) is not None
    }
    settings = Settings(**overrides)
    try:
        if args.command == "serve":
            if settings.auth == "off":
                refuse_keyless([f"{settings.host}:{settings.port}"])
            # The schema is made or checked before hypercorn starts, so that a database too old
            # to serve is one line on stderr rather than a failed lifespan's traceback.
            trio.run(_open_database, settings)
            trio.run(_serve, settings)
            return 0
        return trio.run(partial(_manage, settings, args))
    except (UnsafeSettings, SchemaMismatch) as error:
        print(f"chatsrv: {error.message}", file=sys.stderr)
        return 2


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    # By the time hypercorn closes connections the engine has drained, so this only bounds
    # requests other than turns.
    config.graceful_timeout = 5.0
    # hypercorn's access log and error log, on stderr in CHATSRV_LOG_FORMAT.
    access = logging.getLogger("hypercorn.access")
    access.handlers = [logging.StreamHandler()]
    access.handlers[0].setFormatter(_logs.formatter(settings.log_format))
    access.setLevel(logging.INFO)
    access.propagate = False
    config.accesslog = access
    _logs.reformat([config.log.error_logger], settings.log_format)
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

"""The ``chatsrv`` command: ``chatsrv serve`` and ``chatsrv db init``.

``serve`` runs hypercorn's trio worker in this process and owns the shutdown: on SIGINT (Ctrl-C)
or SIGTERM the engine drains first — running turns get ``CHATSRV_SHUTDOWN_GRACE_S``, every reply
is committed, connected clients get their ``done`` event — and only then is hypercorn told to
close the connections and run the lifespan shutdown.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ._service import Service
from ._settings import Settings
from .app import create_app
from .store import Store


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatsrv", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (CHATSRV_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (CHATSRV_PORT, default 8000)")
    db = commands.add_parser("db", help="database commands")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("init", help="create the tables if they are missing")
    args = parser.parse_args(argv)

    overrides = {
        name: value for name in ("host", "port") if (value := getattr(args, name, None)) is not None
    }
    settings = Settings(**overrides)
    if args.command == "serve":
        trio.run(_serve, settings)
    else:
        trio.run(_db_init, settings)
    return 0


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    # By the time hypercorn closes connections the engine has drained, so this only bounds
    # requests other than turns.
    config.graceful_timeout = 5.0
    config.accesslog = None
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
            print(f"chatsrv: {signal.Signals(signum).name}, draining", file=sys.stderr, flush=True)
            break
    service = extensions.get("chatsrv")
    if isinstance(service, Service):
        service.engine.drain()
        await service.engine.drained.wait()


async def _db_init(settings: Settings) -> None:
    async with Store.open(
        settings.database_url, timeout_s=settings.db_timeout_s, init_schema=False
    ) as store:
        applied = await store.init_schema()
    print("schema applied" if applied else "schema already present")


def _describe_db(settings: Settings) -> str:
    url = settings.database_url
    if url.startswith("sqlite"):
        return "sqlite " + url.split(":///", 1)[-1]
    return "postgresql " + url.rsplit("@", 1)[-1]

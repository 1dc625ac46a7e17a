"""chatsrv's log lines: text for people (``CHATSRV_LOG_FORMAT=text``, the default), or JSON for
log shippers (``json``): one object a line, with ``time``, ``level``, ``logger`` and ``message``,
and the fields a record carries (a turn's end carries its ids, status, sizes and timings). The
same format goes to hypercorn's error log and access log; an access line's object has the
request's method, path, status, size and duration as fields of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pythonjsonlogger.orjson import OrjsonFormatter

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(OrjsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        if record.name == "hypercorn.access" and isinstance(record.args, Mapping):
            # hypercorn logs a request as its access_log_format filled from these "atoms".
            atoms = {key: str(record.args[key]) for key in "hmUqsbDa"}
            log_data.update(
                remote=atoms["h"],
                method=atoms["m"],
                path=atoms["U"],
                query=atoms["q"],
                status=int(atoms["s"]) if atoms["s"].isdigit() else None,
                bytes=int(atoms["b"]) if atoms["b"].isdigit() else None,
                duration_ms=int(atoms["D"]) / 1000,
                user_agent=atoms["a"],
            )


def formatter(kind: Literal["text", "json"]) -> logging.Formatter:
    return JsonLines() if kind == "json" else logging.Formatter(TEXT)


def configure(level: str, kind: Literal["text", "json"]) -> None:
    """chatsrv's records, to stderr in ``kind`` (unless the process configured logging itself:
    then they go where it says)."""
    logger = logging.getLogger("chatsrv")
    logger.setLevel(level)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter(kind))
        logger.addHandler(handler)


def reformat(loggers: list[logging.Logger | None], kind: Literal["text", "json"]) -> None:
    """Give ``kind`` to the handlers of hypercorn's loggers (its error and access logs)."""
    if kind == "text":
        return  # hypercorn's own text format stays
    for logger in loggers:
        for handler in logger.handlers if logger is not None else ():
            handler.setFormatter(formatter(kind))

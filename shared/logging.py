"""Logging set up once, at process start: JSON lines in production, text in a tty."""

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from shared.settings import Settings

# Bound by the APIs per request (request id) and per command (stream id), so every
# line logged while serving it carries them.
log_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "log_context", default=None
)

# Record attributes that are no fields of a line: the standard ones, and the
# copy of its message with terminal colours that uvicorn attaches to its own.
_NOT_FIELDS = {*vars(logging.makeLogRecord({})), "message", "color_message"}

# Loggers that uvicorn gives handlers and formats of its own when it starts,
# before it calls the app factory that configures logging.
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def bind(**values: Any) -> None:
    log_context.set({**(log_context.get() or {}), **values})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(log_context.get() or {})
    fields.update({k: v for k, v in vars(record).items() if k not in _NOT_FIELDS})
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: "
        text += record.getMessage() + (f" {extra}" if extra else "")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(settings: Settings) -> None:
    """Send every line of the process, the server's too, to one handler on stderr.

    `HELIX_LOG_LEVEL` sets the level of them all: uvicorn's `--log-level` and
    Celery's `--loglevel` are not used.
    """
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if use_json else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        # A logger left without a handler and not propagating was turned off
        # (`--no-access-log`): it stays off.
        if logger.handlers or logger.propagate:
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.NOTSET)

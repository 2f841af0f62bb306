"""Logging setup: one format for every line of a process, the server's included."""

import json
import logging
from collections.abc import Iterator

import pytest
import uvicorn

from shared.logging import configure_logging
from shared.settings import Settings

SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("", *SERVER_LOGGERS)]
    saved = [(log, log.handlers[:], log.propagate, log.level) for log in loggers]
    yield
    for logger, handlers, propagate, level in saved:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def start_uvicorn_logging(**options: object) -> None:
    """What uvicorn does to logging when it starts, before it calls the factory."""
    uvicorn.Config("gateway.app:create_app", factory=True, **options)  # type: ignore[arg-type]


def json_settings() -> Settings:
    return Settings(_env_file=None, log_format="json", log_level="INFO")  # type: ignore[call-arg]


def lines(captured: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in captured.splitlines()]


def test_uvicorn_server_and_access_lines_are_json_lines(capsys):
    start_uvicorn_logging()
    configure_logging(json_settings())

    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]",
        4242,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET", "/health/", "1.1", 200
    )

    captured = capsys.readouterr()
    assert captured.out == ""
    first, second = lines(captured.err)
    assert first["logger"] == "uvicorn.error"
    assert first["message"] == "Started server process [4242]"
    assert "color_message" not in first
    assert second["logger"] == "uvicorn.access"
    assert second["message"] == '10.0.0.1:5000 - "GET /health/ HTTP/1.1" 200'


def test_an_error_uvicorn_logs_carries_its_traceback_in_the_json_line(capsys):
    start_uvicorn_logging()
    configure_logging(json_settings())

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")

    (line,) = lines(capsys.readouterr().err)
    assert line["level"] == "error"
    assert "RuntimeError: boom" in str(line["exception"])


def test_an_access_log_turned_off_stays_off(capsys):
    start_uvicorn_logging(access_log=False)
    configure_logging(json_settings())

    logging.getLogger("uvicorn.access").info("GET / 200")

    assert capsys.readouterr().err == ""


def test_helix_log_level_governs_uvicorn_lines_too(capsys):
    start_uvicorn_logging(log_level="debug")
    configure_logging(json_settings().model_copy(update={"log_level": "WARNING"}))

    logging.getLogger("uvicorn.error").info("Waiting for connections to close.")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")

    assert [line["message"] for line in lines(capsys.readouterr().err)] == [
        "Invalid HTTP request received."
    ]

"""One structlog pipeline for sagaworks and for the libraries under it.

FastStream, aio-pika, SQLAlchemy and Alembic log through the standard library;
`ProcessorFormatter` sends their records through the same processors so every
line is either JSON (machines) or readable console output (a terminal), never
a mix. Tracebacks are rendered without frame locals: locals hold URLs,
payloads and credentials. Every URL in a rendered line, ours or a library's
(aio-pika logs its connection with the URL's query), is masked last. A line
logged inside a traced span carries its `trace_id` and `span_id`, so a log
search finds the trace and a trace finds its lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from sagaworks.redaction import mask_urls_in

__all__ = [
    "add_trace_ids",
    "bind_message_context",
    "clear_message_context",
    "configure_logging",
    "get_logger",
]

LogFormat = Literal["auto", "json", "console"]

_NOISY_LIBRARIES = ("aio_pika", "aiormq", "asyncio", "sqlalchemy", "alembic")
_LIBRARIES = ("faststream", "aio_pika", "aiormq", "asyncio", "sqlalchemy", "alembic", "asyncpg")
"""Libraries whose stdlib loggers must reach our renderer (FastStream installs its own)."""


def _renderer(fmt: LogFormat, stream: TextIO) -> Processor:
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    if use_console:
        return structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback,
        )
    return structlog.processors.JSONRenderer()


def _masking_urls(renderer: Processor) -> Processor:
    """`renderer`, then every URL in its line masked: no password leaves in a log line."""

    def render(logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        line = renderer(logger, method, event_dict)
        return mask_urls_in(line) if isinstance(line, str) else line

    return render


def add_trace_ids(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """`trace_id` and `span_id` (hex, as tracing tools show them) of the span now current."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = f"{context.trace_id:032x}"
        event_dict["span_id"] = f"{context.span_id:016x}"
    return event_dict


def configure_logging(
    fmt: LogFormat = "auto", level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging through one renderer on `stream` (stderr)."""
    out = stream or sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer = _renderer(fmt, out)
    tail: list[Processor] = []
    if isinstance(renderer, structlog.processors.JSONRenderer):
        tail.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            _masking_urls(renderer),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _LIBRARIES:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
        library.setLevel(logging.NOTSET)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def bind_message_context(
    *, message_id: str | None, correlation_id: str | None, saga_id: str | None = None
) -> None:
    """Bind ids for every line logged while one message is handled (context-local)."""
    structlog.contextvars.bind_contextvars(
        message_id=message_id, correlation_id=correlation_id, saga_id=saga_id
    )


def clear_message_context() -> None:
    structlog.contextvars.unbind_contextvars("message_id", "correlation_id", "saga_id")

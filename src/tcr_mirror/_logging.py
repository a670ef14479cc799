"""One JSON object per line on stderr, for every process of the project.

Events are lower-case names (``blob_fetch_started``) with key/values given
through ``extra=``. Nothing here redacts: secrets are kept out of log calls
at their source, and the tests search every line for them.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import time
from types import TracebackType

__all__ = ["JsonFormatter", "configure_logging"]

# At most one line per this many seconds for accepts that keep failing.
_ACCEPT_FAILURE_INTERVAL = 10.0

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        # %-arguments that do not fit the message: keep the line JSON.
        return str(record.msg)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _message(record),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # str(), as the traceback's last line has it: the repr of a
            # UnicodeError holds the whole text it failed on, which may be
            # a token endpoint's answer or a credentials header.
            exc = record.exc_info[1]
            event["error"] = f"{record.exc_info[0].__name__}: {exc}"
            event["traceback"] = self.formatException(record.exc_info)
        try:
            return json.dumps(event, default=str, allow_nan=False)
        except (TypeError, ValueError):
            # A value JSON cannot hold (NaN, a dict keyed by tuples, a cycle)
            # would otherwise make logging print its own multi-line report.
            return json.dumps({key: _text(value) for key, value in event.items()})


class _AcceptFailures(logging.Filter):
    """One event per interval for accepts that keep failing.

    trio logs an ``accept`` that failed for want of descriptors or memory
    (``EMFILE``, ``ENOBUFS``, ...) with a traceback, and again every 0.1 s
    for as long as that lasts: ten traceback lines a second from a node out
    of descriptors, which would drown its other events and fill the log
    store. This keeps the first, then one per interval, named as our
    events are and without the traceback (it only ever shows trio's accept
    loop), saying how many failures each line stands for.
    """

    def __init__(self, interval: float = _ACCEPT_FAILURE_INTERVAL) -> None:
        super().__init__()
        self._interval = interval
        self._last = -interval
        self._failures = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self._failures += 1
        now = time.monotonic()
        if now - self._last < self._interval:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        code = exc.errno if isinstance(exc, OSError) else None
        record.msg, record.args = "accept_failed", ()
        record.errno = errno.errorcode.get(code, str(code)) if code else "unknown"
        record.reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        record.failures = self._failures
        record.exc_info = record.exc_text = None
        self._last, self._failures = now, 0
        return True


def _text(value: object) -> object:
    return value if isinstance(value, str | int | bool | None) else str(value)


def configure_logging(level: str = "info") -> None:
    """Send the ``tcr_mirror`` loggers to stderr as JSON lines.

    trio's own few log calls (``accept`` out of file descriptors, say: one
    ``accept_failed`` line per 10 s however often it fails), other
    libraries' warnings, Python's warnings and an exception that ends
    the process go the same way, at warning and above, so stderr stays
    JSON lines only.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, logger_level in (("tcr_mirror", level.upper()), ("trio", "WARNING")):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logger_level)
        logger.propagate = False
    accepts = logging.getLogger("trio.serve_listeners")
    accepts.filters[:] = [_AcceptFailures()]
    # Without a handler on the root, other libraries' warnings and Python's
    # own (through captureWarnings) reach stderr as bare text. Warning is
    # the floor: httpx logs each request's URL at info.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_crash


def _log_crash(
    kind: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:
    """Log an exception that ends the process as one JSON event, not as
    Python's multi-line traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, traceback)
        return
    logging.getLogger("tcr_mirror").critical(
        "process_crashed", exc_info=(kind, exc, traceback)
    )

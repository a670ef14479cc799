"""One JSON object per line on stderr, for every process of the project.

Events are lower-case names (``blob_fetch_started``) with key/values given
through ``extra=``. Nothing here redacts: secrets are kept out of log calls
at their source, and the tests search every line for them.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["JsonFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            event["error"] = repr(record.exc_info[1])
            event["traceback"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(level: str = "info") -> None:
    """Send the ``tcr_mirror`` loggers to stderr as JSON lines.

    trio's own few log calls (``accept`` out of file descriptors, say) go
    the same way, at warning and above, so stderr stays JSON lines only.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, logger_level in (("tcr_mirror", level.upper()), ("trio", "WARNING")):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logger_level)
        logger.propagate = False

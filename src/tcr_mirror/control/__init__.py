"""The TCR control plane: API client, simulator, tokens for the nodes."""

from ._client import CallRecord, TcrClient, TcrResponse
from ._credentials import CloudCredentials
from ._errors import TcrError, TcrTransportError

__all__ = [
    "CallRecord",
    "CloudCredentials",
    "TcrClient",
    "TcrError",
    "TcrResponse",
    "TcrTransportError",
]

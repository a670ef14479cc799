"""A TCR simulator: the API 3.0 actions, their checks, and a token service.

Run it with ``tcr-mirror sim --listen 127.0.0.1:PORT``, or in-process with
:class:`Simulator` and :func:`serve_http`.
"""

from ._app import Simulator
from ._http import Handler, serve_http, serve_listeners_http
from ._jwt import SigningKey
from ._schema import SimError
from ._state import SimConfig, SimState
from ._verify import Key

__all__ = [
    "Handler",
    "Key",
    "SigningKey",
    "SimConfig",
    "SimError",
    "SimState",
    "Simulator",
    "serve_http",
    "serve_listeners_http",
]

"""Servers of the tests' own, in trio, each on a 127.0.0.1 port of its own."""

from __future__ import annotations

import trio

__all__ = ["LoopbackServer"]


class LoopbackServer:
    """Serves each connection to :meth:`_connection`, which a subclass writes.

    Start it with ``await nursery.start(server.serve)``; ``port`` is set
    by then.
    """

    port = 0

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError

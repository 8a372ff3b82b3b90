"""A TCP forwarder on 127.0.0.1 that tests can break on purpose.

Between a pool and the real server it plays the network: `cut()` silences every open link
without closing it (a dead route: no FIN, no RST, nothing arrives), `refuse()` also closes new
connections at once, as if nothing listened, `stall()` lets new connections in and never
answers them, and `restore()` forwards new connections again.
It counts the connections it accepts, so a test can tell how often a client tried to connect.
"""

from __future__ import annotations

import contextlib
import socket

import gevent
from gevent.server import StreamServer


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.sockets = (client, upstream)
        self.dead = False


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self._target = (target_host, target_port)
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._links: list[_Link] = []
        self.refusing = False
        self.stalling = False
        self.accepted = 0

    @property
    def port(self) -> int:
        return self._server.server_port

    def start(self) -> TcpProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=1)
        for link in self._links:
            for sock in link.sockets:
                sock.close()

    def cut(self) -> None:
        """Every open link goes silent: bytes sent either way are swallowed, nothing closes."""
        for link in self._links:
            link.dead = True

    def refuse(self) -> None:
        """Open links are cut and new connections are closed as soon as they arrive."""
        self.cut()
        self.refusing = True

    def stall(self) -> None:
        """New connections are accepted and then hear nothing: a connect that never ends."""
        self.stalling = True

    def restore(self) -> None:
        """New connections are forwarded again; links cut before stay dead."""
        self.refusing = False
        self.stalling = False

    def _handle(self, client: socket.socket, _address) -> None:
        self.accepted += 1
        if self.refusing:
            client.close()
            return
        link = _Link(client, socket.create_connection(self._target))
        link.dead = self.stalling
        self._links.append(link)
        client, upstream = link.sockets
        gevent.joinall(
            [
                gevent.spawn(_pump, link, client, upstream),
                gevent.spawn(_pump, link, upstream, client),
            ]
        )


def _pump(link: _Link, source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            if not link.dead:
                sink.sendall(data)
    except OSError:
        return
    if not link.dead:  # pass an orderly close on; a dead link never closes
        for sock in link.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

"""A TCP proxy a test can cut and restore: a real network outage between a worker and its database."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stalled = threading.Event()
        self.port = 0

    @classmethod
    def in_front_of(cls, url: str, default_port: int) -> tuple[TcpProxy, str]:
        """A started proxy to ``url``'s host and port, and ``url`` pointing at the proxy instead."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or default_port).start()
        credentials = parts.netloc.rpartition("@")[0]
        return proxy, parts._replace(netloc=f"{credentials}@127.0.0.1:{proxy.port}".lstrip("@")).geturl()

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self.port = server.getsockname()[1]
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Refuse new connections and break every open one, as a failed network or database would."""
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            # close() alone does not wake a thread blocked in accept() on Linux: that thread would still
            # take (and proxy) the next connection. shutdown() makes accept() fail at once.
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        self.start()

    def stall(self) -> None:
        """Silently drop what clients send while keeping every connection open: a network that loses
        packets without anybody noticing (what comes back from the target still arrives)."""
        self._stalled.set()

    def resume(self) -> None:
        """Pass traffic again on connections made from now on (a stalled one stays broken: cut it)."""
        self._stalled.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # cut while this connection was being made
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b, stall in ((client, upstream, self._stalled), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, stall), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, stall: threading.Event | None) -> None:
        try:
            while data := source.recv(65536):
                if stall is None or not stall.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

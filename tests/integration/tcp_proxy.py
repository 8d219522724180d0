"""A small TCP proxy for link-fault tests, on 127.0.0.1 with a port the OS picks.

Faults, switchable at any time from the test:
  * delay(seconds): every chunk forwarded waits this long first (both directions);
  * rate(bytes_per_second): forward at most this fast (0: unlimited);
  * drop(): stop forwarding silently: bytes are read and discarded, connections stay open
    (a black hole, as a dead router makes);
  * cut(): close every connection now (resets both ends); new connections are still accepted;
  * refuse(): cut, and close new connections at once (the peer looks down);
  * heal(): back to normal forwarding (drop and refuse off, delay and rate kept).

`route(target)` adds a second listener (its own port) to the same proxy: its connections see
the same faults (a replication link and its bulk lane, say, are one link).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._delay = 0.0
        self._rate = 0
        self._dropping = False
        self._refusing = False
        self._closed = False
        self.bytes_forwarded = 0
        self.connections = 0
        self._listeners: list[tuple[socket.socket, threading.Thread]] = []
        self.port: int = self._listen(target)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def route(self, target: tuple[str, int]) -> str:
        """Forward another port (the address returned) to `target`, under the same faults."""
        return f"127.0.0.1:{self._listen(target)}"

    # --- faults ------------------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def rate(self, bytes_per_second: int) -> None:
        self._rate = bytes_per_second

    def drop(self) -> None:
        self._dropping = True

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def refuse(self) -> None:
        self._refusing = True
        self.cut()

    def heal(self) -> None:
        self._dropping = False
        self._refusing = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        for listener, thread in self._listeners:
            listener.close()
            thread.join(timeout=5)

    # --- plumbing ------------------------------------------------------------------------------

    def _listen(self, target: tuple[str, int]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        thread = threading.Thread(target=self._accept_loop, args=(listener, target), daemon=True)
        self._listeners.append((listener, thread))
        thread.start()
        port: int = listener.getsockname()[1]
        return port

    def _accept_loop(self, listener: socket.socket, target: tuple[str, int]) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._dropping:
                    continue
                if self._delay:
                    time.sleep(self._delay)
                if self._rate:
                    time.sleep(len(data) / self._rate)
                dst.sendall(data)
                self.bytes_forwarded += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

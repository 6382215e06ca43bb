"""A small TCP forwarder for fault tests: switch its backend (a failover behind a proxy or a
DNS name) or cut responses off mid-body (a connection reset during a download).

New connections go to the current backend; connections already open stay where they are,
as they do when a name resolves to a new address.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class Forwarder:
    def __init__(self, backend_port: int, cut_after: int | None = None) -> None:
        self.backend_port = backend_port
        self.cut_after = cut_after
        """Reset each connection once this many bytes came back from the backend."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def switch(self, backend_port: int) -> None:
        """Send new connections to ``backend_port``; open ones stay on the old backend."""
        self.backend_port = backend_port

    def close(self) -> None:
        """Refuse new connections and end the open ones at once (a close alone leaves a
        socket another thread is reading open, and its peer waiting for a read timeout)."""
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=5)
            except OSError:
                client.close()
                continue
            backend.settimeout(None)
            with self._lock:
                self._sockets += [client, backend]
            threading.Thread(target=self._pump, args=(client, backend, None), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(backend, client, self.cut_after), daemon=True
            ).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, cut_after: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if cut_after is not None and sent + len(data) > cut_after:
                    sink.sendall(data[: max(0, cut_after - sent)])
                    # SO_LINGER 0: close with a TCP RST, as a dropped connection looks. The
                    # other direction's thread is reading one of them: SHUT_RD wakes it, so
                    # the close happens now, not when its peer gives up.
                    for sock in (sink, source):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RD)
                        sock.close()
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (sink, source):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

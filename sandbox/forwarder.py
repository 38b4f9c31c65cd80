"""In-container egress forwarder: relays TCP connections on 127.0.0.1:3128 to a Unix socket."""

# Standard library only, no project imports: this very file is bind-mounted read-only into
# containers and run there as `python3 -I -S forwarder.py SOCKET [HOST:PORT]`. The host side
# imports it for FORWARDER_PATH, forwarder_command() and container_command().

from __future__ import annotations

import selectors
import socket
import sys
import time
from pathlib import Path

FORWARDER_PATH = Path(__file__).resolve()
"""This script on the host: bind-mount it read-only at `CONTAINER_FORWARDER_PATH`."""
CONTAINER_FORWARDER_PATH = "/opt/managed-agents/egress-forwarder.py"
DEFAULT_LISTEN = "127.0.0.1:3128"
BUFFER_BYTES = 64 << 10
"""At most this much is buffered per direction of a connection."""
MAX_CONNECTIONS = 512
"""Beyond this, new connections wait in the listen backlog."""
UNIX_CONNECT_TIMEOUT = 5.0
ACCEPT_BACKOFF = 0.5

_UNAVAILABLE_TEXT = b"Egress proxy unavailable: the sandbox cannot reach the network now.\n"
_UNAVAILABLE = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (len(_UNAVAILABLE_TEXT), _UNAVAILABLE_TEXT)
)


def forwarder_command(
    socket_path_in_container: str,
    *,
    listen: str = DEFAULT_LISTEN,
    script: str = CONTAINER_FORWARDER_PATH,
) -> list[str]:
    """The argv that runs the forwarder inside a container (with the container's `python3`)."""
    return ["python3", "-I", "-S", script, socket_path_in_container, listen]


def container_command(socket_path_in_container: str, **kwargs: str) -> list[str]:
    """A container main command: keeps the container alive and (re)starts the forwarder.

    The forwarder runs as the container's user, so the sandbox can kill it; it comes back within
    a second (that only ever cuts the sandbox's own connections)."""
    script = 'while :; do "$@"; sleep 1; done & while :; do sleep 86400; done'
    return ["sh", "-c", script, "sh", *forwarder_command(socket_path_in_container, **kwargs)]


class _Direction:
    """Bytes read from `src`, waiting to be written to `dst`."""

    __slots__ = ("buf", "dst", "eof", "shut", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray()
        self.eof = False
        self.shut = False


class _Pair:
    __slots__ = ("down", "sockets", "up")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.up = _Direction(client, upstream)
        self.down = _Direction(upstream, client)
        self.sockets = (client, upstream)

    def reading_from(self, sock: socket.socket) -> _Direction:
        return self.up if sock is self.up.src else self.down

    def writing_to(self, sock: socket.socket) -> _Direction:
        return self.up if sock is self.up.dst else self.down

    def done(self) -> bool:
        return self.up.shut and self.down.shut


class Forwarder:
    """Pairs each accepted TCP connection with a fresh connection to the Unix socket and copies
    bytes both ways, passing half-closes on.

    One single-threaded selector loop (threads would count against the container's pids limit),
    at most `BUFFER_BYTES` buffered per direction and `MAX_CONNECTIONS` pairs. It enforces
    nothing: the proxy behind the socket does, so killing or replacing the forwarder gains the
    sandbox nothing.
    """

    def __init__(self, unix_path: str, listen: tuple[str, int]) -> None:
        self.unix_path = unix_path
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(listen)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.pairs: set[_Pair] = set()
        self.listening = False
        self.paused_until = 0.0
        self.registered: dict[socket.socket, int] = {}
        self._listen(True)

    def _listen(self, on: bool) -> None:
        if on and not self.listening:
            self.selector.register(self.listener, selectors.EVENT_READ, None)
        elif not on and self.listening:
            self.selector.unregister(self.listener)
        self.listening = on

    def run(self) -> None:
        while True:
            timeout = None
            if self.paused_until:
                timeout = max(0.0, self.paused_until - time.monotonic())
            for key, events in self.selector.select(timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._service(key.data, key.fileobj, events)  # type: ignore[arg-type]
            if self.paused_until and time.monotonic() >= self.paused_until:
                self.paused_until = 0.0
                self._listen(len(self.pairs) < MAX_CONNECTIONS)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            # Out of descriptors, say: the listener stays readable, so pause instead of spinning.
            sys.stderr.write(f"egress forwarder: accept failed: {exc}\n")
            self.paused_until = time.monotonic() + ACCEPT_BACKOFF
            self._listen(False)
            return
        upstream = None
        try:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.settimeout(UNIX_CONNECT_TIMEOUT)
            upstream.connect(self.unix_path)
        except OSError as exc:
            sys.stderr.write(f"egress forwarder: cannot reach {self.unix_path}: {exc}\n")
            if upstream is not None:
                upstream.close()
            _refuse(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream)
        self.pairs.add(pair)
        self._update(pair)
        if len(self.pairs) >= MAX_CONNECTIONS:
            self._listen(False)

    def _service(self, pair: _Pair, sock: socket.socket, events: int) -> None:
        if pair not in self.pairs:
            return  # closed earlier in this same round of events
        try:
            if events & selectors.EVENT_READ:
                self._read(pair.reading_from(sock))
            if events & selectors.EVENT_WRITE:
                self._write(pair.writing_to(sock))
        except OSError:
            self._close(pair)  # reset, broken pipe...: drop both sides
            return
        for direction in (pair.up, pair.down):
            if direction.eof and not direction.buf and not direction.shut:
                direction.shut = True
                try:
                    direction.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if pair.done():
            self._close(pair)
        else:
            self._update(pair)

    def _read(self, direction: _Direction) -> None:
        try:
            data = direction.src.recv(BUFFER_BYTES - len(direction.buf))
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            direction.eof = True
            return
        direction.buf += data
        self._write(direction)  # usually goes straight through: saves a select round trip

    def _write(self, direction: _Direction) -> None:
        if not direction.buf:
            return
        try:
            sent = direction.dst.send(direction.buf)
        except (BlockingIOError, InterruptedError):
            return
        del direction.buf[:sent]

    def _update(self, pair: _Pair) -> None:
        for sock in pair.sockets:
            reading, writing = pair.reading_from(sock), pair.writing_to(sock)
            mask = 0
            if not reading.eof and len(reading.buf) < BUFFER_BYTES:
                mask |= selectors.EVENT_READ
            if writing.buf:
                mask |= selectors.EVENT_WRITE
            current = self.registered.get(sock, 0)
            if mask == current:
                continue
            if not mask:
                self.selector.unregister(sock)
                del self.registered[sock]
            elif not current:
                self.selector.register(sock, mask, pair)
                self.registered[sock] = mask
            else:
                self.selector.modify(sock, mask, pair)
                self.registered[sock] = mask

    def _close(self, pair: _Pair) -> None:
        for sock in pair.sockets:
            if self.registered.pop(sock, 0):
                self.selector.unregister(sock)
            sock.close()
        self.pairs.discard(pair)
        if len(self.pairs) < MAX_CONNECTIONS and not self.paused_until:
            self._listen(True)


def _refuse(client: socket.socket) -> None:
    """Answer 502 and close, without blocking the loop for long."""
    try:
        client.settimeout(1)
        client.sendall(_UNAVAILABLE)
        client.shutdown(socket.SHUT_WR)
        # Read what already arrived (the request): closing with unread data would reset the
        # connection, and the client could lose the answer.
        client.setblocking(False)
        while client.recv(BUFFER_BYTES):
            pass
    except OSError:
        pass
    client.close()


def _parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        sys.stderr.write("usage: forwarder.py UNIX_SOCKET [HOST:PORT]\n")
        return 2
    listen = _parse_listen(argv[1] if len(argv) > 1 else DEFAULT_LISTEN)
    try:
        forwarder = Forwarder(argv[0], listen)
    except OSError as exc:
        sys.stderr.write(f"egress forwarder: cannot listen on {listen[0]}:{listen[1]}: {exc}\n")
        return 1
    host, port = forwarder.listener.getsockname()[:2]
    sys.stderr.write(f"egress forwarder: {host}:{port} -> {argv[0]}\n")
    sys.stderr.flush()
    try:
        forwarder.run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

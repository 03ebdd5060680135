"""A slow object store for tests and benchmarks: moto's S3 server behind a TCP proxy that makes
uploads take `rate` bytes per second in all (a token bucket shared by every connection). The
request goes to moto at once (moto handles a request at a time: a body trickling in would hold
every other client up), and the reply is held until the request's bytes have had their turn,
so the client sees the slow upload. Run as its own process (`python benchmarks/slow_s3.py RATE`), so
neither the server nor the proxy takes the GIL of the training process; it prints
"ready <moto port> <proxy port>" and serves until killed."""

from __future__ import annotations

import socket
import sys
import threading
import time

CHUNK = 16 * 1024


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate, self.next, self.lock = rate, time.monotonic(), threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + n / self.rate
            wait = self.next - now  # this chunk's turn ends then
        time.sleep(wait)


class _Conn:
    """One client connection: bytes sent upstream and not yet paid for by a held reply."""

    def __init__(self) -> None:
        self.unpaid = 0
        self.lock = threading.Lock()


def _requests(src: socket.socket, dst: socket.socket, conn: _Conn) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
            with conn.lock:
                conn.unpaid += len(data)
    except OSError:
        pass
    finally:
        _close(src, dst)


def _replies(src: socket.socket, dst: socket.socket, conn: _Conn, bucket) -> None:
    try:
        while data := src.recv(CHUNK):
            with conn.lock:
                n, conn.unpaid = conn.unpaid, 0
            if bucket is not None and n:
                bucket.take(n)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve(rate: float) -> None:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        moto_port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    bucket = TokenBucket(rate) if rate > 0 else None
    print(f"ready {moto_port} {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", moto_port))
        conn = _Conn()
        threading.Thread(target=_requests, args=(client, upstream, conn), daemon=True).start()
        threading.Thread(target=_replies, args=(upstream, client, conn, bucket), daemon=True).start()


if __name__ == "__main__":
    serve(float(sys.argv[1]))

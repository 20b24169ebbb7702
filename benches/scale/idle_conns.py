#!/usr/bin/env python3
"""Opens N HTTP/1.1 keep-alive connections to the gateway and holds them idle (idle_rss.sh).

With --request, one GET is made on each connection first (its response read to the end), so
the connection holds whatever a served request leaves behind; without it, the connections
have only been accepted. Prints "ready N" once all are open, holds them --hold seconds, then
prints how many the gateway closed meanwhile ("closed K") and exits.
"""

import argparse
import socket
import sys
import time


def read_response(sock):
    """Reads one response with a Content-Length body; returns its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed inside the response body")
        body += chunk
    return status


def still_open(sock):
    """False when the peer closed the connection (a read would return EOF or an error)."""
    # Non-blocking: a socket with a timeout would wait for data before peeking.
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr", help="host:port of the gateway's proxy listener")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--request", action="store_true", help="one GET on each connection first")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold them open")
    args = p.parse_args()
    host, port = args.addr.rsplit(":", 1)
    conns = []
    failed = 0
    for i in range(args.count):
        s = socket.create_connection((host, int(port)), timeout=10)
        if args.request:
            s.sendall(
                b"GET /idle HTTP/1.1\r\nHost: bench\r\nx-shard-key: %d\r\n\r\n" % i
            )
            if read_response(s) != 200:
                failed += 1
        conns.append(s)
    print(f"ready {len(conns)} failed_requests {failed}", flush=True)
    time.sleep(args.hold)
    closed = sum(1 for s in conns if not still_open(s))
    print(f"closed {closed}", flush=True)
    for s in conns:
        s.close()
    return 0 if failed == 0 and closed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Helpers of benches/side-by-side.sh (Python 3 standard library only).

  tools.py slow-origin PORT LOG        origin that answers any GET after 300 ms with 64 KiB,
                                       appending each request's path to LOG (fills are counted)
  tools.py paths KIND OUT ...          writes one request path per line for wrk (see `paths`)
  tools.py sign KEY URL                the parasol path of URL, as `parasol sign` prints it
  tools.py burst N HOST PORT PATH      N connections open first, then N requests at once;
                                       prints "ok p50_ms p99_ms max_ms" of the complete responses
  tools.py stream N HOST PORT PATH     the same, timing each response's first body byte and its
                                       last: prints "ok first_p50 first_max last_p50 last_max" (ms)
"""
import asyncio
import base64
import hashlib
import hmac
import http.server
import os
import socketserver
import sys
import threading
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parasol_path(key: str, source: str) -> str:
    """The native signed path, as `parasol sign` prints it (HMAC-SHA256 over src64)."""
    src64 = b64(source.encode())
    sig = b64(hmac.new(key.encode(), src64.encode(), hashlib.sha256).digest())
    return f"/m/{sig}/{src64}"


def camo_path(key: str, source: str) -> str:
    """camo's `/<hex HMAC-SHA1>/<hex url>` form."""
    digest = hmac.new(key.encode(), source.encode(), hashlib.sha1).hexdigest()
    return f"/{digest}/{source.encode().hex()}"


def paths(kind: str, out: str, args: list) -> None:
    """KIND is one of:
    zipf-plain N                 /z/<i>.jpg for i in 0..N
    zipf-parasol N KEY ORIGIN    the same sources, signed for parasol
    miss-parasol N KEY ORIGIN TAG  N distinct sources /u/TAG-i.jpg (64 KiB, distinct bytes)
    miss-plain N PREFIX TAG        PREFIX/u/TAG-i.jpg (nginx /pass/)
    miss-camo N KEY ORIGIN TAG     the same sources in camo's form
    """
    n = int(args[0])
    with open(out, "w") as f:
        for i in range(n):
            if kind == "zipf-plain":
                line = f"/z/{i}.jpg"
            elif kind == "zipf-parasol":
                line = parasol_path(args[1], f"{args[2]}/z/{i}.jpg")
            elif kind == "miss-parasol":
                line = parasol_path(args[1], f"{args[2]}/u/{args[3]}-{i}.jpg")
            elif kind == "miss-plain":
                line = f"{args[1]}/u/{args[2]}-{i}.jpg"
            elif kind == "miss-camo":
                line = camo_path(args[1], f"{args[2]}/u/{args[3]}-{i}.jpg")
            else:
                sys.exit(f"unknown kind {kind}")
            f.write(line + "\n")


def slow_origin(port: int, log: str) -> None:
    body = b"\xff\xd8\xff\xe0" + os.urandom(64 * 1024 - 4)
    lock = threading.Lock()
    logf = open(log, "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            with lock:
                logf.write(self.path + "\n")
            time.sleep(0.3)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "public, max-age=604800")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    Server(("127.0.0.1", port), Handler).serve_forever()


async def one(host, port, path, start: asyncio.Event, times: list):
    """One request once `start` is set; appends (status, seconds to the first body bytes,
    seconds to the last)."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    await start.wait()
    t0 = time.monotonic()
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    first = await reader.read(min(length, 1 << 16)) if length else b""
    t_first = time.monotonic() - t0
    await reader.readexactly(length - len(first))
    times.append((status, t_first, time.monotonic() - t0))
    writer.close()


async def all_at_once(n: int, host: str, port: int, path: str, deadline: float) -> list:
    """N connections opened first, then N requests sent at once; their `one` timings."""
    start, times = asyncio.Event(), []
    tasks = [asyncio.create_task(one(host, port, path, start, times)) for _ in range(n)]
    await asyncio.sleep(0.5)  # every connection open before the first request
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), deadline)
    return times


async def burst(n: int, host: str, port: int, path: str) -> None:
    times = await all_at_once(n, host, port, path, 60)
    ok = sorted(t for s, _, t in times if s == 200)
    if not ok:
        print("0 0 0 0")
        return
    pct = lambda p: ok[min(len(ok) - 1, int(p * len(ok)))] * 1000
    print(f"{len(ok)} {pct(0.5):.1f} {pct(0.99):.1f} {ok[-1] * 1000:.1f}")


async def stream(n: int, host: str, port: int, path: str) -> None:
    times = await all_at_once(n, host, port, path, 120)
    ok = [(f, l) for s, f, l in times if s == 200]
    if not ok:
        print("0 0 0 0 0")
        return
    firsts, lasts = sorted(f for f, _ in ok), sorted(l for _, l in ok)
    mid = lambda v: v[len(v) // 2] * 1000
    print(f"{len(ok)} {mid(firsts):.1f} {firsts[-1] * 1000:.1f} {mid(lasts):.1f} {lasts[-1] * 1000:.1f}")


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "slow-origin":
        slow_origin(int(args[0]), args[1])
    elif cmd == "paths":
        paths(args[0], args[1], args[2:])
    elif cmd == "sign":
        print(parasol_path(args[0], args[1]))
    elif cmd == "stream":
        asyncio.run(stream(int(args[0]), args[1], int(args[2]), args[3]))
    elif cmd == "burst":
        asyncio.run(burst(int(args[0]), args[1], int(args[2]), args[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

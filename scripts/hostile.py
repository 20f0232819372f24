#!/usr/bin/env python3
"""Readers and clients that try to deny writers, measured from outside.

Runs the five cases of docs/reliability.md ("Readers cannot deny writers")
against a release binary, each on a fresh service on a free loopback port,
with a well-behaved writer on its own address (127.0.0.2) beside the
hostile client, and prints one line a case: the service's RSS before and
while the case runs, the writer's 2xx answers, and for the token case the
server CPU a wrong-token request costs.

    scripts/hostile.py target/release/eventflow            # every case
    scripts/hostile.py --case 2 target/release/eventflow   # one case
    HOSTILE_TOKENS=1 scripts/hostile.py --case 5 target/release/eventflow
    scripts/hostile.py --old /tmp/old/eventflow            # a build without
        # the reader bounds: the settings it does not know are left out

Only 127.0.0.0/8 is used; every loop is bounded.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

WRITER = "127.0.0.2"
HOSTILE = "127.0.0.3"
PAGE = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Tokens the service knows in case 5 (HOSTILE_TOKENS=1 shows a request's
# cost without them).
TOKENS = int(os.environ.get("HOSTILE_TOKENS", "100000"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The binary on a free port, its events' stdout thrown away."""

    def __init__(self, binary, env, old):
        self.port = free_port()
        full = dict(os.environ)
        full.update({"EVENTFLOW__SERVER__ADDR": f"127.0.0.1:{self.port}",
                     "EVENTFLOW__TELEMETRY__LOG_LEVEL": "warn"})
        for key, value in env.items():
            if old and key.startswith("!"):
                continue
            full[key.lstrip("!")] = str(value)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([binary], env=full, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"the service exited {self.proc.returncode}: {self.log.read().decode()[-2000:]}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        sys.exit("the service never became healthy")

    def request(self, method, path, body=None, headers=None, source="127.0.0.1", timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout,
                                          source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stat(self):
        """(RSS in MiB, CPU seconds so far)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return rss / 1024, cpu

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def unread(port, request, source=HOSTILE):
    """A connection that sends `request` and never reads the answer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAGE)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(request.encode())
    return s


def writer(service, n, token=None, spacing=0.0):
    """`n` single events from the writer's address; how many got a 2xx."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    ok = 0
    for i in range(n):
        body = json.dumps({"id": f"writer-{time.monotonic_ns()}-{i}",
                           "timestamp": 1_700_000_000, "payload": "x"})
        try:
            status, _ = service.request("POST", "/events", body, headers, WRITER, timeout=5)
            ok += 200 <= status < 300
        except OSError:
            pass
        time.sleep(spacing)
    return ok


def ingest(service, count, payload, headers=None):
    """`count` events of `payload`, in batches of up to 8 MiB."""
    size = max(1, min(100, (8 << 20) // len(json.dumps(payload))))
    for start in range(0, count, size):
        batch = [{"id": f"e{i:05}", "timestamp": 1_700_000_000, "payload": payload}
                 for i in range(start, min(start + size, count))]
        status, body = service.request("POST", "/events/batch", json.dumps(batch),
                                       {"content-type": "application/json", **(headers or {})},
                                       timeout=60)
        assert status == 202, (status, body[:300])
    # Until the last is published, so pages and replays hold every one.
    last = f"e{count - 1:05}"
    for _ in range(600):
        status, body = service.request("GET", f"/events/{last}", headers=headers)
        if status == 200 and json.loads(body).get("status") == "processed":
            return
        time.sleep(0.1)
    sys.exit("the events were never published")


def while_held(service, requests, settle, writes):
    """Holds `requests` (source address, request) open unread, lets them
    settle for `settle` seconds, then runs the writer: (RSS before, RSS
    during, 2xx, writes, no CPU figure)."""
    before = service.stat()[0]
    held = [unread(service.port, request, source) for source, request in requests]
    time.sleep(settle)
    ok = writer(service, writes)
    during = service.stat()[0]
    for s in held:
        s.close()
    return before, during, ok, writes, None


def case_pages(binary, old):
    """1. Twenty unread `GET /events?limit=1000` pages of ~4 MiB."""
    service = Service(binary, {}, old)
    try:
        ingest(service, 1000, "p" * 4000)
        page = "GET /events?limit=1000 HTTP/1.1\r\nhost: x\r\n\r\n"
        return while_held(service, [(HOSTILE, page)] * 20, 2, 50)
    finally:
        service.stop()


def case_replays(binary, old):
    """2. Eight SSE subscribers replaying 300 events of 64 K U+0001, unread."""
    service = Service(binary, {}, old)
    try:
        ingest(service, 300, "\u0001" * 65536)
        replay = "GET /events/stream HTTP/1.1\r\nhost: x\r\nlast-event-id: 0\r\n\r\n"
        return while_held(service, [(HOSTILE, replay)] * 8, 5, 50)
    finally:
        service.stop()


def case_lookups(binary, old):
    """3. 1,000 connections pipelining two lookups of a 64 K event, unread."""
    service = Service(binary, {}, old)
    try:
        ingest(service, 1, "\u0001" * 65536)
        lookups = "GET /events/e00000 HTTP/1.1\r\nhost: x\r\n\r\n" * 2
        # 250 from each of four addresses, under the per-client cap, so
        # that only the answers' budget stands in the way.
        requests = [(f"127.0.1.{i % 4 + 1}", lookups) for i in range(1000)]
        return while_held(service, requests, 5, 50)
    finally:
        service.stop()


def case_connections(binary, old):
    """4. One address holding every connection of `max_connections = 50`."""
    service = Service(binary, {"EVENTFLOW__SERVER__MAX_CONNECTIONS": 50,
                               "EVENTFLOW__SERVER__MAX_SUBSCRIBERS": 10,
                               "!EVENTFLOW__SERVER__MAX_CONNECTIONS_PER_CLIENT": 25}, old)
    stop = threading.Event()
    held = []

    def hog():
        # Keeps 200 sockets open (those accepted and those waiting in the
        # backlog), opening a new one for each the service closes.
        while not stop.is_set():
            for s in list(held):
                try:
                    s.setblocking(False)
                    if s.recv(1) == b"":
                        held.remove(s)
                        s.close()
                except BlockingIOError:
                    pass
                except OSError:
                    held.remove(s)
                    s.close()
            while len(held) < 200 and not stop.is_set():
                s = socket.socket()
                s.bind((HOSTILE, 0))
                s.settimeout(2)
                try:
                    s.connect(("127.0.0.1", service.port))
                    held.append(s)
                except OSError:
                    s.close()
                    break
            time.sleep(0.05)

    try:
        before = service.stat()[0]
        thread = threading.Thread(target=hog, daemon=True)
        thread.start()
        time.sleep(2)
        ok = writer(service, 20)
        during = service.stat()[0]
        stop.set()
        thread.join()
        for s in held:
            s.close()
        return before, during, ok, 20, None
    finally:
        service.stop()


def case_tokens(binary, old):
    """5. 100,000 tokens, rate 1/s: 500 wrong-token requests; CPU each."""
    with tempfile.NamedTemporaryFile("w", suffix=".tokens", delete=False) as f:
        for i in range(100_000 - TOKENS, 100_000):
            f.write(f"token-{i:06}-{'k' * 40}\n")
        tokens = f.name
    good = f"token-{99_999:06}-{'k' * 40}"
    service = Service(binary, {"EVENTFLOW__AUTH__TOKENS_FILE": tokens,
                               "EVENTFLOW__SERVER__RATE_LIMIT_PER_SECOND": 1}, old)
    try:
        before, cpu_before = service.stat()
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10,
                                          source_address=(HOSTILE, 0))
        body = json.dumps({"id": "guess", "timestamp": 1, "payload": "x"})
        for i in range(500):
            conn.request("POST", "/events", body,
                         {"content-type": "application/json",
                          "authorization": f"Bearer guess-{i:06}-{'k' * 40}"})
            conn.getresponse().read()
        conn.close()
        during, cpu_after = service.stat()
        # The writer keeps to its token's rate of one a second.
        ok = writer(service, 10, token=good, spacing=1.05)
        return before, during, ok, 10, (cpu_after - cpu_before) / 500
    finally:
        service.stop()
        os.unlink(tokens)


CASES = [case_pages, case_replays, case_lookups, case_connections, case_tokens]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--case", type=int, choices=range(1, len(CASES) + 1))
    parser.add_argument("--old", action="store_true",
                        help="leave out the settings a build before the reader bounds does not know")
    args = parser.parse_args()
    print("| case | RSS before (MiB) | RSS during (MiB) | writer's 2xx | CPU per request |")
    print("|---|---|---|---|---|")
    for number, case in enumerate(CASES, 1):
        if args.case and args.case != number:
            continue
        before, during, ok, n, cpu = case(args.binary, args.old)
        cpu_text = f"{cpu * 1e6:.0f} µs" if cpu is not None else ""
        print(f"| {case.__doc__.strip()} | {before:.0f} | {during:.0f} | {ok}/{n} | {cpu_text} |",
              flush=True)


if __name__ == "__main__":
    main()

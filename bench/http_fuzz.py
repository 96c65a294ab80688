"""HTTP fuzzing of a running service: no request, however malformed, may get a 5xx.

    .venv/bin/python bench/http_fuzz.py --requests 100000   # starts its own stack + service
    from bench.http_fuzz import fuzz_http                    # against a service already running

Requests go to every route over real HTTP on several keep-alive connections at once. A third
are raw bytes (random, JSON-ish token soup, invalid UTF-8), about half are valid requests
mutated structurally (a value replaced by ``NaN``/``Infinity``/integers past int64/huge or
deeply nested values/lone surrogates, duplicated, dropped or unknown keys, wrapped in lists,
truncated or with a byte flipped), the rest valid; content types, methods and credentials
vary too. The mutators are plain functions of a ``random.Random`` so the in-process tests
(tests/service/test_malformed.py) drive the same ones with hypothesis.

As a script: starts Redis + broker (LocalStack), publishes a synthetic snapshot with the real
Publisher (bench/serve.py's state), starts ``freshrec service`` as a child process with an
events token, fuzzes it, prints a table and writes ``bench/results/http_fuzz.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import os
import platform
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
USERS, ITEMS = 5_000, 20_000  # bench/serve.py's state
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
GET_ROUTES = ("/v1/model", "/healthz", "/readyz", "/metrics")
# Twice the default body limit: larger bodies only exercise the 413 path again.
MAX_BODY_BYTES = 2 << 20


# ---- a JSON tree that can say what JSON libraries refuse to write ---------------------------


class Raw(bytes):
    """Bytes written verbatim into the document (``NaN``, ``1e400``, broken escapes...)."""


@dataclass
class Obj:
    """A JSON object as a list of pairs, so that keys may repeat."""

    pairs: list[tuple[str, Any]]


def to_tree(value: Any) -> Any:
    """Plain JSON-able Python value -> tree (dicts become :class:`Obj`)."""
    if isinstance(value, dict):
        return Obj([(k, to_tree(v)) for k, v in value.items()])
    if isinstance(value, list):
        return [to_tree(v) for v in value]
    return value


def _scalar(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):  # ints past 64 bits, lone surrogates
        return json.dumps(value).encode()


def encode(node: Any, limit: int | None = None) -> bytes:
    """Serialize a tree; :class:`Raw` leaves are copied as they are.

    With ``limit``, the document is cut after that many bytes: repeated list mutations
    multiply sizes, and building a 100 MB body to send its first megabytes would stall the
    load generator. Repeated subtrees (``[x] * 1001``) are encoded once.
    """
    memo: dict[int, bytes] = {}
    cap = limit if limit is not None else 1 << 62

    def enc(n: Any) -> bytes:
        if isinstance(n, Raw):
            return bytes(n)
        if not isinstance(n, (Obj, list)):
            return _scalar(n)
        cached = memo.get(id(n))
        if cached is not None:
            return cached
        parts, total = [], 0
        items = ((_scalar(k) + b":", v) for k, v in n.pairs) if isinstance(n, Obj) else (
            (b"", v) for v in n)
        for prefix, v in items:
            part = prefix + enc(v)
            parts.append(part)
            total += len(part) + 1
            if total > cap:
                break
        out = (b"{%s}" if isinstance(n, Obj) else b"[%s]") % b",".join(parts)
        memo[id(n)] = out
        return out

    body = enc(node)
    return body if limit is None else body[:limit]


def _nested(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


_NASTY: tuple[Any, ...] = (
    Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity"), Raw(b"1e400"), Raw(b"-1e400"),
    2**63, -(2**63) - 1, 2**64, 10**30, Raw(b"1" * 20), Raw(b"1" * 400), Raw(b"1" * 5000),
    Raw(b"-0.0"), 1e308, 5e-324, "", "x" * 129, "x" * 5000, Raw(b'"\\ud800"'),
    Raw(b'"\\u0000"'), None, True, _nested(50, "list"), _nested(300, "object"),
    _nested(3000, "list"), _nested(3000, "object"), Raw(b'"\xff\xfe"'),
)


def nasty_value(rng: random.Random) -> Any:
    """One value that has broken a JSON API somewhere (fresh containers, shared constants)."""
    choice = rng.randrange(len(_NASTY) + 3)
    if choice < len(_NASTY):
        return _NASTY[choice]
    if choice == len(_NASTY):
        return []
    if choice == len(_NASTY) + 1:
        return Obj([])
    return Raw(orjson.dumps([rng.random() for _ in range(rng.choice((65, 2000)))]))


def _containers(node: Any, out: list[Any], budget: int = 2_000) -> list[Any]:
    """Objects and lists in ``node``, visiting at most ``budget`` of them (lists repeated
    10,000 times by earlier mutations would otherwise make every later one slow)."""
    todo = [node]
    while todo and len(out) < budget:
        n = todo.pop()
        if isinstance(n, Obj):
            out.append(n)
            todo.extend(v for _, v in n.pairs)
        elif isinstance(n, list):
            out.append(n)
            todo.extend(n[:budget])
    return out


def mutate_tree(tree: Any, rng: random.Random) -> Any:
    """Apply one structural mutation somewhere in ``tree`` (in place); returns the root."""
    containers = _containers(tree, [])
    if not containers or rng.random() < 0.05:
        return nasty_value(rng)
    node = rng.choice(containers)
    op = rng.randrange(7)
    if isinstance(node, Obj) and node.pairs:
        i = rng.randrange(len(node.pairs))
        key, value = node.pairs[i]
        if op <= 2:
            node.pairs[i] = (key, nasty_value(rng))
        elif op == 3:
            node.pairs.append((key, nasty_value(rng) if rng.random() < 0.5 else value))
        elif op == 4:
            del node.pairs[i]
        elif op == 5:
            node.pairs.append((rng.choice(("x", "p_true", "context", "sample_rate", "ts",
                                           "\ud800".encode("utf-8", "surrogatepass")
                                           .decode("latin-1"))), nasty_value(rng)))
        else:
            node.pairs[i] = (key, [value] * rng.choice((1, 2, 1001)))
    elif isinstance(node, list) and node:
        i = rng.randrange(len(node))
        if op <= 3:
            node[i] = nasty_value(rng)
        elif op == 4:
            del node[i]
        else:
            node.extend([node[i]] * rng.choice((1, 10, 10_001)))
    elif isinstance(node, (Obj, list)):
        return nasty_value(rng)
    return tree


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A byte-level mutation: truncate, flip, insert invalid UTF-8, prefix a BOM."""
    if not data:
        return bytes([rng.randrange(256)])
    op = rng.randrange(5)
    i = rng.randrange(len(data))
    if op == 0:
        return data[:i]
    if op == 1:
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    if op == 2:
        return data[:i] + rng.choice((b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x00")) + data[i:]
    if op == 3:
        return b"\xef\xbb\xbf" + data
    return data + data[:i]


_TOKENS = (b"{", b"}", b"[", b"]", b":", b",", b'"', b"\\", b"null", b"true", b"-", b"0",
           b"1e9", b"NaN", b'"user_id"', b'"candidates"', b'"ts"', b"\xff", b" ", b"\n")


def raw_body(rng: random.Random) -> bytes:
    """Random bytes, or a soup of JSON tokens (which reaches further into parsers)."""
    if rng.random() < 0.5:
        return rng.randbytes(rng.choice((0, 1, 8, 64, 512, 4096)))
    return b"".join(rng.choice(_TOKENS) for _ in range(rng.randrange(1, 200)))


# ---- valid requests --------------------------------------------------------------------------


def valid_score(rng: random.Random) -> dict[str, Any]:
    """A ``/v1/score`` body over bench/serve.py's users and items."""
    u = rng.randrange(USERS)
    return {"user_id": f"u{u}",
            "features": {"age": 18 + u % 50, "gender": "MF"[u % 2], "occupation": f"occ{u % 21}"},
            "top_k": rng.randint(1, 10), "explore": rng.random() < 0.5,
            "candidates": [{"item_id": f"m{j}", "features": {
                "genres": [GENRES[j % 6]], "release_year": 1940 + j % 60}}
                for j in rng.sample(range(ITEMS), rng.randint(1, 20))]}


def valid_event(rng: random.Random) -> dict[str, Any]:
    """A ``/v1/events`` body from a public client (no pipeline-only fields)."""
    return {"event_id": f"fuzz-{rng.getrandbits(64):x}", "ts": time.time() - rng.random() * 60,
            "user_id": f"u{rng.randrange(USERS)}", "item_id": f"m{rng.randrange(ITEMS)}",
            "label": rng.randint(0, 1)}


@dataclass
class Case:
    """One HTTP request to send."""

    method: str
    path: str
    headers: dict[str, str | bytes]
    body: bytes
    kind: str  # valid / mutated / raw


_CONTENT_TYPES = ("application/json", "application/json; charset=utf-8", "text/plain",
                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/problem+json", "application/json; charset=latin-1", "*/*", "")


def fuzz_case(rng: random.Random, token: str | None) -> Case:
    """One request: valid, structurally mutated JSON or raw bytes, to any route."""
    route = rng.choice(("/v1/score", "/v1/score", "/v1/events", "/v1/events", *GET_ROUTES,
                        "/nowhere"))
    headers: dict[str, str | bytes] = {}
    method = "POST" if route.startswith("/v1/") and route != "/v1/model" else "GET"
    if route == "/nowhere" or rng.random() < 0.03:
        method = rng.choice(("GET", "POST", "PUT", "DELETE", "PATCH"))
    template = valid_event(rng) if route == "/v1/events" else valid_score(rng)
    if route == "/v1/events" and rng.random() < 0.3:
        template = [valid_event(rng) for _ in range(rng.randint(1, 5))]
    r = rng.random()
    if r < 0.2:
        kind, body = "valid", encode(to_tree(template), MAX_BODY_BYTES)
        if method == "GET":
            body = b""
    elif r < 0.7:
        kind, tree = "mutated", to_tree(template)
        for _ in range(rng.randint(1, 3)):
            tree = mutate_tree(tree, rng)
        body = encode(tree, MAX_BODY_BYTES)
        if rng.random() < 0.15:
            body = mutate_bytes(body, rng)
    else:
        kind, body = "raw", raw_body(rng)
    ct = "application/json" if rng.random() < 0.8 else rng.choice(_CONTENT_TYPES)
    if ct:
        headers["content-type"] = ct
    if token is not None and rng.random() < 0.85:
        headers["authorization"] = f"Bearer {token}"
    elif rng.random() < 0.3:
        headers["authorization"] = rng.choice(("Bearer wrong-token-0123456789", "Basic eA==",
                                               "Bearer", "bearer x y", b"Bearer \xc3\xa9t\xc3\xa9"))
    return Case(method, route, headers, body, kind)


# ---- the load ---------------------------------------------------------------------------------


class _Connection:
    """A minimal HTTP/1.1 keep-alive client connection (asyncio streams).

    httpx costs ~1 ms of client CPU per request, which on two shared cores made the load
    generator, not the service, the bottleneck; writing pre-encoded requests and reading
    ``Content-Length``/chunked responses costs a few percent of that.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            head = await self._send(raw)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # The server may close a keep-alive connection that sat idle (uvicorn: after 5 s);
            # like any HTTP client, resend once on a fresh connection. A failure on a fresh
            # connection is the server's and is reported.
            partial = getattr(exc, "partial", b"")
            if not reused or partial:
                raise
            await self.close()
            head = await self._send(raw)
        assert self.reader is not None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def _send(self, raw: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        await self.writer.drain()
        return await self.reader.readuntil(b"\r\n\r\n")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def encode_request(case: Case, host: str) -> bytes:
    """The request as bytes on the wire (``Content-Length`` always set)."""
    lines = [f"{case.method} {case.path} HTTP/1.1".encode(), f"host: {host}".encode(),
             f"content-length: {len(case.body)}".encode()]
    for k, v in case.headers.items():
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode("latin-1")))
    return b"\r\n".join(lines) + b"\r\n\r\n" + case.body


async def _run(base_url: str, cases: Iterator[Case], concurrency: int
               ) -> tuple[Counter, Counter, list[dict], list[dict]]:
    by_status: Counter = Counter()
    by_kind_5xx: Counter = Counter()
    examples: list[dict] = []
    slowest: list[tuple[float, int, dict]] = []
    tie = itertools.count()
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    it = cases  # one generator shared by the workers (no await inside it)

    async def worker() -> None:
        conn = _Connection(host, port)
        try:
            for case in it:
                started = time.perf_counter()
                text = b""
                try:
                    code, text = await asyncio.wait_for(
                        conn.request(encode_request(case, url.netloc)), 30.0)
                    status = str(code)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        TimeoutError, ValueError, IndexError) as exc:
                    status = f"error:{type(exc).__name__}"
                    await conn.close()
                latency = time.perf_counter() - started
                if len(slowest) < 5 or latency > slowest[0][0]:
                    heapq.heappush(slowest, (latency, next(tie), {
                        "ms": round(latency * 1e3, 1), "method": case.method,
                        "path": case.path, "kind": case.kind, "status": status,
                        "bytes": len(case.body), "body": case.body[:120].decode("latin-1")}))
                    if len(slowest) > 5:
                        heapq.heappop(slowest)
                by_status[status] += 1
                if status.startswith(("5", "error")):
                    by_kind_5xx[case.kind] += 1
                    if len(examples) < 10:
                        examples.append({"method": case.method, "path": case.path,
                                         "status": status, "headers": {
                                             k: v if isinstance(v, str) else v.decode("latin-1")
                                             for k, v in case.headers.items()},
                                         "body": case.body[:300].decode("latin-1"),
                                         "response": text[:300].decode("latin-1")})
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return by_status, by_kind_5xx, examples, [x for _, _, x in sorted(slowest, reverse=True)]


def fuzz_http(base_url: str, requests: int, seed: int, token: str | None = None,
              concurrency: int = 16) -> dict[str, Any]:
    """Send ``requests`` fuzzed requests to the service at ``base_url``; count the answers.

    ``token`` is the events bearer token (most event requests present it, so that mutated
    bodies get past authentication to the parser). ``concurrency`` keep-alive connections
    send in parallel. Transport failures (the server dropping a connection, a 30 s timeout)
    are counted under ``by_status`` as ``error:<kind>`` and in ``http_5xx``, since a client
    sees them as server failures too.
    Returns ``http_fuzz_requests``, ``http_5xx``, ``by_status``, ``by_kind`` and up to ten
    examples of failing requests.
    """
    rng = random.Random(seed)
    kinds: Counter = Counter()

    def cases() -> Iterator[Case]:  # lazily: 100k cases held at once would take gigabytes
        for _ in range(requests):
            case = fuzz_case(rng, token)
            kinds[case.kind] += 1
            yield case

    started = time.perf_counter()
    by_status, by_kind_5xx, examples, slowest = asyncio.run(_run(base_url, cases(),
                                                                 concurrency))
    seconds = time.perf_counter() - started
    failures = sum(n for s, n in by_status.items() if s.startswith(("5", "error")))
    return {"http_fuzz_requests": sum(by_status.values()), "http_5xx": failures,
            "by_status": dict(sorted(by_status.items())),
            "by_kind": dict(kinds),
            "failures_by_kind": dict(by_kind_5xx), "failure_examples": examples,
            "slowest": slowest,
            "seconds": round(seconds, 1), "requests_per_s": round(requests / seconds, 1),
            "concurrency": concurrency, "seed": seed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--name", default="http_fuzz", help="bench/results/NAME.json")
    args = ap.parse_args()

    import redis

    from bench.serve import MODEL, build_state
    from featurestore.snapshot_writer import SnapshotStore
    from freshrec.devstack import LocalStack, free_port, wait_http_ok
    from freshrec.settings import Settings
    from trainer.publisher import Publisher

    topics = ("fuzz.events", "fuzz.impressions", "fuzz.events.dlq")
    stack = LocalStack(topics=topics, partitions=2)
    stack.start()
    try:
        port, token = free_port(), secrets.token_urlsafe(24)
        values = {"model_name": MODEL, "topic_events": topics[0], "topic_impressions": topics[1],
                  "topic_dlq": topics[2], "service_port": port, "service_api_token": token}
        settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
                            **values)
        Publisher(SnapshotStore(redis.Redis.from_url(stack.redis_url), MODEL),
                  build_state(settings), settings).publish_full()
        env = stack.env() | {f"FRESHREC_{k.upper()}": str(v) for k, v in values.items()}
        stack.spawn_component("service", "service", env=env)
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{url}/readyz", timeout=60, stack=stack)
        result = fuzz_http(url, args.requests, args.seed, token, args.concurrency)
        if (problem := stack.check_children()) is not None:
            result["service_exited"] = problem
        result["service_alive_after"] = problem is None
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()}
    finally:
        stack.stop()
    print(f"{'status':>24} {'requests':>10}")
    for status, n in result["by_status"].items():
        print(f"{status:>24} {n:>10}")
    print(f"{'total':>24} {result['http_fuzz_requests']:>10}")
    print(f"5xx or transport failures: {result['http_5xx']} "
          f"({result['requests_per_s']:.0f} req/s over {args.concurrency} connections)")
    for ex in result["failure_examples"][:3]:
        print("  e.g.", json.dumps(ex)[:300])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    return 0 if result["http_5xx"] == 0 and result["service_alive_after"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

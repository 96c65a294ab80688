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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
USERS, ITEMS = 5_000, 20_000  # bench/serve.py's state
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
GET_ROUTES = ("/v1/model", "/healthz", "/readyz", "/metrics")


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


def encode(node: Any) -> bytes:
    """Serialize a tree; :class:`Raw` leaves are copied as they are."""
    if isinstance(node, Raw):
        return bytes(node)
    if isinstance(node, Obj):
        return b"{" + b",".join(json.dumps(k).encode() + b":" + encode(v)
                                for k, v in node.pairs) + b"}"
    if isinstance(node, list):
        return b"[" + b",".join(encode(v) for v in node) + b"]"
    return json.dumps(node).encode()


def _nested(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


def nasty_value(rng: random.Random) -> Any:
    """One value that has broken a JSON API somewhere."""
    choice = rng.randrange(24)
    return [
        Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity"), Raw(b"1e400"), Raw(b"-1e400"),
        2**63, -(2**63) - 1, 2**64, 10**30, Raw(b"1" * rng.choice((20, 400, 5000))),
        Raw(b"-0.0"), 1e308, 5e-324, "", "x" * rng.choice((129, 5000)), Raw(b'"\\ud800"'),
        Raw(b'"\\u0000"'), None, True, [], Obj([]),
        _nested(rng.choice((50, 300, 3000)), rng.choice(("list", "object"))),
        Raw(b'"\xff\xfe"'), [rng.random() for _ in range(rng.choice((65, 2000)))],
    ][choice]


def _containers(node: Any, out: list[Any]) -> list[Any]:
    if isinstance(node, Obj):
        out.append(node)
        for _, v in node.pairs:
            _containers(v, out)
    elif isinstance(node, list):
        out.append(node)
        for v in node:
            _containers(v, out)
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
        kind, body = "valid", encode(to_tree(template))
        if method == "GET":
            body = b""
    elif r < 0.7:
        kind, tree = "mutated", to_tree(template)
        for _ in range(rng.randint(1, 3)):
            tree = mutate_tree(tree, rng)
        body = encode(tree)
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


async def _run(base_url: str, cases: list[Case], concurrency: int
               ) -> tuple[Counter, Counter, list[dict], list[dict]]:
    by_status: Counter = Counter()
    by_kind_5xx: Counter = Counter()
    examples: list[dict] = []
    slowest: list[tuple[float, int, dict]] = []
    tie = itertools.count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as client:
        it = iter(cases)

        async def worker() -> None:
            for case in it:
                started = time.perf_counter()
                try:
                    resp = await client.request(case.method, case.path, content=case.body,
                                                headers=case.headers)
                    status = str(resp.status_code)
                except httpx.HTTPError as exc:
                    status = f"error:{type(exc).__name__}"
                    resp = None
                latency = time.perf_counter() - started
                if len(slowest) < 5 or latency > slowest[0][0]:
                    heapq.heappush(slowest, (latency, next(tie), {
                        "ms": round(latency * 1e3, 1), "method": case.method,
                        "path": case.path, "kind": case.kind, "status": status,
                        "bytes": len(case.body), "body": case.body[:120].decode("latin-1")}))
                    if len(slowest) > 5:
                        heapq.heappop(slowest)
                by_status[status] += 1
                if status.startswith("5") or status.startswith("error"):
                    by_kind_5xx[case.kind] += 1
                    if len(examples) < 10:
                        examples.append({"method": case.method, "path": case.path,
                                         "status": status, "headers": case.headers,
                                         "body": case.body[:300].decode("latin-1"),
                                         "response": resp.text[:300] if resp else ""})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return by_status, by_kind_5xx, examples, [x for _, _, x in sorted(slowest, reverse=True)]


def fuzz_http(base_url: str, requests: int, seed: int, token: str | None = None,
              concurrency: int = 16) -> dict[str, Any]:
    """Send ``requests`` fuzzed requests to the service at ``base_url``; count the answers.

    ``token`` is the events bearer token (most event requests present it, so that mutated
    bodies get past authentication to the parser). Transport failures (the server closing a
    connection on a request it could not parse) are counted under ``by_status`` as
    ``error:<kind>`` and in ``http_5xx``, since a client sees them as server failures too.
    Returns ``http_fuzz_requests``, ``http_5xx``, ``by_status``, ``by_kind`` and up to ten
    examples of failing requests.
    """
    rng = random.Random(seed)
    cases = [fuzz_case(rng, token) for _ in range(requests)]
    started = time.perf_counter()
    by_status, by_kind_5xx, examples, slowest = asyncio.run(_run(base_url, cases, concurrency))
    seconds = time.perf_counter() - started
    failures = sum(n for s, n in by_status.items() if s.startswith(("5", "error")))
    return {"http_fuzz_requests": sum(by_status.values()), "http_5xx": failures,
            "by_status": dict(sorted(by_status.items())),
            "by_kind": dict(Counter(c.kind for c in cases)),
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
    from featurestore.snapshot_store import SnapshotStore
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

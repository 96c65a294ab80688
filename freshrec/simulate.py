"""Closed-loop simulation: a population with known click probabilities uses the live service.

Each simulated request picks a user and a candidate set, asks ``POST /v1/score`` for the top
items, and clicks each shown item with its ground-truth probability from
:class:`freshrec.synthetic.SyntheticStream`. Clicks go to Kafka as bare click events; the
service already logged the impression; the joiner turns both into labeled examples; the trainer
learns and publishes; the service scores the next request with what was learned. Nothing in the
loop is simulated except the users.

Measured per window of requests: the expected CTR of what was served (mean true p of shown
items, lower-variance than realised clicks), the realised CTR, the expected CTR of a random
top-k from the same candidates (the non-learning baseline, same requests), and the oracle top-k.
New items keep arriving; for each we record how many requests passed before it was first shown.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson
from confluent_kafka import Producer

from freshrec.kafka import DeliveryTracker, producer_config
from freshrec.synthetic import SyntheticConfig, SyntheticStream


@dataclass(frozen=True)
class ClosedLoopConfig:
    """Shape of the simulated population and traffic."""

    requests: int = 2000
    candidates: int = 40
    top_k: int = 4
    n_users: int = 300
    n_items: int = 200
    new_item_every: int = 50  # one new item per this many requests
    window: int = 200
    explore: bool = True
    seed: int = 0


@dataclass
class ClosedLoopResult:
    """CTR curves and discovery times of one simulated run."""

    windows: list[dict[str, float]] = field(default_factory=list)
    discovery_requests: list[int] = field(default_factory=list)
    undiscovered: int = 0
    clicks: int = 0
    shown: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def ctr_lift(self) -> float:
        """Expected CTR of served items ÷ random baseline, in the final window."""
        last = self.windows[-1]
        return last["served_p"] / last["random_p"] if last["random_p"] > 0 else float("nan")


class ClosedLoop:
    """Drives the live service with simulated users and feeds their clicks back to Kafka."""

    def __init__(self, service_url: str, bootstrap: str, clicks_topic: str,
                 config: ClosedLoopConfig | None = None, token: str | None = None) -> None:
        self.config = c = config or ClosedLoopConfig()
        self.world = SyntheticStream(SyntheticConfig(n_users=c.n_users, n_items=c.n_items,
                                                     new_items_per_s=0.0, seed=c.seed))
        self.rng = np.random.default_rng(c.seed + 1)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=service_url, timeout=10.0, headers=headers)
        self.producer = Producer(producer_config(bootstrap, **{"linger.ms": 1}))
        self.tracker = DeliveryTracker()
        self.clicks_topic = clicks_topic
        self.n_items = c.n_items
        self.introduced: dict[int, int] = {}  # new item -> request index it appeared at

    def _request(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict]] | None:
        c = self.config
        user = int(self.rng.zipf(1.3) - 1) % c.n_users
        # Candidates: random live items, always including the newest few so that new items
        # have a chance to be shown at all (as a fresh-content candidate source would).
        newest = np.arange(max(0, self.n_items - 3), self.n_items)
        rest = self.rng.choice(self.n_items, size=c.candidates - len(newest), replace=False)
        items = np.unique(np.concatenate([rest, newest]))
        feats = self.world.item_features(items)
        body = {
            "user_id": f"u{user}",
            "features": self.world.user_features(np.array([user]))[0],
            "candidates": [{"item_id": f"i{i}", "features": f}
                           for i, f in zip(items, feats, strict=True)],
            "top_k": c.top_k,
            "explore": c.explore,
        }
        resp = self.http.post("/v1/score", content=orjson.dumps(body),
                              headers={"content-type": "application/json"})
        if resp.status_code != 200:
            return None
        out = resp.json()
        now = time.time()
        p = self.world.click_probability(np.full(len(items), user), items,
                                         np.full(len(items), self.world.config.start_ts))
        shown = np.array([int(it["item_id"][1:]) for it in out["items"]])
        shown_p = p[np.searchsorted(items, shown)]
        clicked = self.rng.random(len(shown)) < shown_p
        for item in shown[clicked]:
            click = {"event_id": uuid.uuid4().hex, "ts": now, "user_id": f"u{user}",
                     "item_id": f"i{item}", "request_id": out["request_id"]}
            self.producer.produce(self.clicks_topic, orjson.dumps(click),
                                  key=f"u{user}".encode(), on_delivery=self.tracker)
        self.producer.poll(0)
        stats = [{"served_p": float(shown_p.mean()), "clicks": int(clicked.sum()),
                  "random_p": float(p.mean()),
                  "oracle_p": float(np.sort(p)[-len(shown):].mean())}]
        for item in shown:
            if item in self.introduced and self.introduced[item] >= 0:
                self.result.discovery_requests.append(index - self.introduced[item])
                self.introduced[item] = -1
        return shown, clicked, stats

    def run(self, progress: bool = False) -> ClosedLoopResult:
        """Run the configured number of requests; returns the curves."""
        c = self.config
        self.result = result = ClosedLoopResult()
        started = time.monotonic()
        window: list[dict] = []
        for index in range(c.requests):
            if index and index % c.new_item_every == 0:
                self.introduced[self.n_items] = index
                self.n_items += 1
            got = self._request(index)
            if got is None:
                result.errors += 1
                continue
            shown, clicked, stats = got
            result.shown += len(shown)
            result.clicks += int(clicked.sum())
            window += stats
            if len(window) >= c.window:
                result.windows.append({
                    "request": index + 1,
                    "seconds": time.monotonic() - started,
                    **{k: float(np.mean([w[k] for w in window]))
                       for k in ("served_p", "random_p", "oracle_p")},
                    "ctr": float(np.sum([w["clicks"] for w in window])
                                 / (len(window) * c.top_k)),
                })
                window = []
                if progress:
                    w = result.windows[-1]
                    print(f"requests {index + 1:>6}  served p {w['served_p']:.3f}  "
                          f"random p {w['random_p']:.3f}  oracle p {w['oracle_p']:.3f}",
                          flush=True)
        self.producer.flush(30)
        result.undiscovered = sum(1 for v in self.introduced.values() if v >= 0)
        result.seconds = time.monotonic() - started
        if self.tracker.failed:
            raise RuntimeError(f"click delivery failed: {self.tracker.errors[:3]}")
        return result

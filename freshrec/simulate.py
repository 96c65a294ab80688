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
from collections.abc import Callable
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
    n_user_clusters: int = 4  # tastes: fewer clusters, fewer cells to learn per example
    taste_scale: float = 3.0
    new_item_every: int = 50  # one new item per this many requests
    window: int = 200
    explore: bool = True
    rate: float = 0.0  # requests per wall second; 0 = as fast as the service answers
    seed: int = 0


@dataclass
class ClosedLoopResult:
    """CTR curves and discovery times of one simulated run."""

    windows: list[dict[str, float]] = field(default_factory=list)
    # (request index a new item appeared at, requests until first shown or None if never)
    new_items: list[tuple[int, int | None]] = field(default_factory=list)
    # New items whose first showing was thanks to the exploration bonus (``explored``).
    discovered_by_exploration: int = 0
    # Expected CTR served during warm-up, before the trainer had learned anything.
    untrained: dict[str, float] = field(default_factory=dict)
    clicks: int = 0
    shown: int = 0
    errors: int = 0
    requests: int = 0
    seconds: float = 0.0

    def discovered_share(self, min_age: int) -> float:
        """Share of new items older than ``min_age`` requests that were shown at least once."""
        old = [wait for at, wait in self.new_items if at <= self.requests - min_age]
        return sum(w is not None for w in old) / len(old) if old else float("nan")

    @property
    def discovery_requests(self) -> list[int]:
        """Requests from a new item's arrival to its first showing, for those shown."""
        return [w for _, w in self.new_items if w is not None]

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
        self.world = SyntheticStream(SyntheticConfig(
            n_users=c.n_users, n_items=c.n_items, n_clusters=c.n_user_clusters,
            scale=c.taste_scale, new_items_per_s=0.0, seed=c.seed))
        self.rng = np.random.default_rng(c.seed + 1)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=service_url, timeout=10.0, headers=headers)
        self.producer = Producer(producer_config(bootstrap, **{"linger.ms": 1}))
        self.tracker = DeliveryTracker()
        self.clicks_topic = clicks_topic
        self.n_items = c.n_items
        self.introduced: dict[int, int] = {}  # new item -> request index it appeared at
        self.discovered: dict[int, int] = {}  # new item -> requests until first shown
        self.untrained: dict[str, float] = {}

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
        was_explored = np.array([bool(it.get("explored")) for it in out["items"]], dtype=bool)
        stats = [{"served_p": float(shown_p.mean()), "clicks": int(clicked.sum()),
                  "random_p": float(p.mean()),
                  "oracle_p": float(np.sort(p)[-len(shown):].mean()),
                  # what the model chose on its own, apart from what the bonus added
                  "exploited_p": (float(shown_p[~was_explored].mean())
                                  if (~was_explored).any() else float("nan")),
                  "explored_share": float(was_explored.mean()) if len(shown) else 0.0}]
        explored = {int(it["item_id"][1:]) for it in out["items"] if it.get("explored")}
        for item in shown if index >= 0 else ():
            if item in self.introduced and item not in self.discovered:
                self.discovered[item] = index - self.introduced[item]
                self.result.discovered_by_exploration += item in explored
        return shown, clicked, stats

    def warm_up(self, learned: Callable[[], bool], timeout: float = 120.0) -> int:
        """Serve unrecorded requests until ``learned()`` (e.g. the trainer has trained).

        Consumer groups take seconds to form; measuring before the loop is closed would
        measure start-up, not learning. Returns the number of warm-up requests.
        """
        self.result = ClosedLoopResult()
        deadline = time.monotonic() + timeout
        stats: list[dict] = []
        while not learned():
            if time.monotonic() > deadline:
                raise TimeoutError("the pipeline did not start learning from clicks")
            got = self._request(-1)
            if got is not None:
                stats += got[2]
            time.sleep(0.02)
        if stats:
            self.untrained = {k: float(np.mean([w[k] for w in stats]))
                              for k in ("served_p", "random_p")}
        return len(stats)

    def run(self, progress: bool = False) -> ClosedLoopResult:
        """Run the configured number of requests; returns the curves."""
        c = self.config
        self.result = result = ClosedLoopResult(untrained=self.untrained)
        started = time.monotonic()
        window: list[dict] = []
        for index in range(c.requests):
            if c.rate > 0:
                delay = started + index / c.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
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
                    **{k: float(np.nanmean([w[k] for w in window]))
                       for k in ("served_p", "random_p", "oracle_p", "exploited_p",
                                 "explored_share")},
                    "ctr": float(np.sum([w["clicks"] for w in window])
                                 / (len(window) * c.top_k)),
                })
                window = []
                if progress:
                    w = result.windows[-1]
                    print(f"requests {index + 1:>6}  served p {w['served_p']:.3f}  "
                          f"random p {w['random_p']:.3f}  oracle p {w['oracle_p']:.3f}  "
                          f"exploited p {w['exploited_p']:.3f}  "
                          f"explored {w['explored_share']:.2f}", flush=True)
        self.producer.flush(30)
        result.new_items = [(at, self.discovered.get(item))
                            for item, at in self.introduced.items()]
        result.requests = c.requests
        result.seconds = time.monotonic() - started
        if self.tracker.failed:
            raise RuntimeError(f"click delivery failed: {self.tracker.errors[:3]}")
        return result

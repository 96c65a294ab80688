"""Redis clients for a URL that may point at one server or at a node of a Redis Cluster.

A cluster needs redis-py's cluster client (it follows MOVED/ASK redirections and routes each
key to its master); a single server needs the plain one. ``redis_cluster`` in the settings says
which; either way the server is asked once (``INFO cluster``) when the client is made. Unset, a
server that cannot be reached then is taken for a single server (the default deployment); set,
a server that answers otherwise is a configuration error (:class:`RedisModeError`).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from freshrec.settings import Settings, redact_url

# What "Redis is unavailable" looks like: a cluster whose slot lost its master raises
# SlotNotCoveredError, which is not a RedisError.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def cluster_mode(url: str, timeout_s: float = 2.0) -> bool | None:
    """Whether the server at ``url`` runs in cluster mode; None when it cannot be asked."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def is_cluster(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at ``url`` runs in cluster mode (False when unreachable)."""
    return bool(cluster_mode(url, timeout_s))


def _cluster_url(url: str) -> str:
    # A cluster has only database 0, and redis-py's cluster client refuses any "/db" path.
    head, sep, tail = url.rpartition("/")
    return head if sep and tail.isdigit() and "//" in head else url


class RedisModeError(ValueError):
    """``redis_cluster`` contradicts what the server at ``redis_url`` says it is."""


def _wants_cluster(settings: Settings) -> bool:
    """The setting when given (checked against the server when it answers), else the server.

    A wrong forced value would fail later and obscurely (a plain client on a cluster gets
    MOVED for most keys; a cluster client on a plain server cannot load its slots), so a
    server that answers and contradicts it is an error naming the setting.
    """
    mode = cluster_mode(settings.redis_url)
    forced = settings.redis_cluster
    if forced is None:
        return bool(mode)
    if mode is not None and mode != forced:
        raise RedisModeError(
            f"FRESHREC_REDIS_CLUSTER={str(forced).lower()} but {redact_url(settings.redis_url)} "
            f"is {'a Redis Cluster node' if mode else 'a single Redis (cluster_enabled:0)'}")
    return forced


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis | RedisCluster:
    """A synchronous client for ``settings.redis_url`` (cluster-aware)."""
    if _wants_cluster(settings):
        return RedisCluster.from_url(_cluster_url(settings.redis_url), **kwargs)
    return redis.Redis.from_url(settings.redis_url, **kwargs)


def async_redis_client(settings: Settings, **kwargs: Any) -> aredis.Redis | AsyncRedisCluster:
    """An asyncio client for ``settings.redis_url`` (cluster-aware)."""
    if _wants_cluster(settings):
        return AsyncRedisCluster.from_url(_cluster_url(settings.redis_url), **kwargs)
    return aredis.Redis.from_url(settings.redis_url, **kwargs)


__all__ = [
    "REDIS_UNAVAILABLE", "RedisModeError", "async_redis_client", "cluster_mode", "is_cluster",
    "redis_client",
]

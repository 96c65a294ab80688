"""Redis clients for a URL that may point at one server or at a node of a Redis Cluster.

A cluster needs redis-py's cluster client (it follows MOVED/ASK redirections and routes each
key to its master); a single server needs the plain one. ``redis_cluster`` in the settings says
which; unset, the server is asked once (``INFO cluster``) when the client is made, and a server
that cannot be reached then is taken for a single server (the default deployment).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from freshrec.settings import Settings

# What "Redis is unavailable" looks like: a cluster whose slot lost its master raises
# SlotNotCoveredError, which is not a RedisError.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def is_cluster(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at ``url`` runs in cluster mode (False when unreachable)."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _cluster_url(url: str) -> str:
    # A cluster has only database 0, and redis-py's cluster client refuses any "/db" path.
    head, sep, tail = url.rpartition("/")
    return head if sep and tail.isdigit() and "//" in head else url


def _wants_cluster(settings: Settings) -> bool:
    if settings.redis_cluster is not None:
        return settings.redis_cluster
    return is_cluster(settings.redis_url)


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


__all__ = ["REDIS_UNAVAILABLE", "async_redis_client", "is_cluster", "redis_client"]

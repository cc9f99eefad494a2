"""L1 in Redis: one cache shared by every server replica.

Each response is a string key `<prefix>r:<sha256>` set with `PX ttl` (Redis expires it on
its own), and a sorted set `<prefix>lru` scores keys by last use; a store past `max_entries`
pops the least recently used. The cap counts only nanoseek's keys, so the cache cannot
crowd out other users of the same Redis (and Redis's own `maxmemory` still applies).

Every command is bounded by `timeout` (socket connect and read) and never retried: a paused
or unreachable Redis makes a call fail in `timeout` seconds (redis-py's own default is 5 s
with retries), and the response cache serves that request without it.
"""

from __future__ import annotations

import time

from .urls import DEFAULT_TIMEOUT, redact


class RedisStore:
    name = "redis"

    def __init__(self, url: str, ttl: float | None = None, max_entries: int = 10000,
                 clock=time.time, prefix: str = "nanoseek:cache:", timeout: float = DEFAULT_TIMEOUT):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as e:
            raise ImportError(f"response cache {redact(url)}: the Redis store needs the 'redis' "
                              "package (pip install 'nanoseek[cache]')") from e
        self.url, self.ttl, self.max_entries, self.clock = redact(url), ttl, max_entries, clock
        self.prefix = prefix
        self._db = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        try:
            self._db.ping()  # fail at start-up, naming the URL, not on the first request
        except redis.RedisError as e:
            raise ConnectionError(f"response cache {self.url}: Redis does not answer within "
                                  f"{timeout} s ({type(e).__name__}: {e})") from None
        self._lru = f"{prefix}lru"

    def _key(self, key: str) -> str:
        return f"{self.prefix}r:{key}"

    def get(self, key: str) -> str | None:
        value = self._db.get(self._key(key))
        if value is None:
            self._db.zrem(self._lru, key)  # expired by Redis: drop its place in the LRU too
            return None
        self._db.zadd(self._lru, {key: self.clock()}, xx=True)
        return value.decode("utf-8")

    def put(self, key: str, value: str) -> None:
        px = None if self.ttl is None else max(1, int(self.ttl * 1000))
        with self._db.pipeline(transaction=True) as pipe:
            pipe.set(self._key(key), value.encode("utf-8"), px=px)
            pipe.zadd(self._lru, {key: self.clock()})
            pipe.zcard(self._lru)
            size = pipe.execute()[-1]
        if size > self.max_entries:
            evicted = self._db.zpopmin(self._lru, size - self.max_entries)
            if evicted:
                self._db.delete(*(self._key(k.decode("utf-8")) for k, _ in evicted))

    def __len__(self) -> int:
        return self._db.zcard(self._lru)

    def clear(self) -> None:
        keys = [self._key(k.decode("utf-8")) for k in self._db.zrange(self._lru, 0, -1)]
        self._db.delete(self._lru, *keys)

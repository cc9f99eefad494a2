"""L1 in Redis: one cache shared by every server replica.

Each response is a string key `<prefix>r:<sha256>` set with `PX ttl` (Redis expires it on
its own), and a sorted set `<prefix>lru` scores keys by last use; a store past `max_entries`
pops the least recently used. The cap counts only nanoseek's keys, so the cache cannot
crowd out other users of the same Redis (and Redis's own `maxmemory` still applies).
"""

from __future__ import annotations

import time


class RedisStore:
    name = "redis"

    def __init__(self, url: str, ttl: float | None = None, max_entries: int = 10000,
                 clock=time.time, prefix: str = "nanoseek:cache:"):
        try:
            import redis
        except ImportError as e:
            raise ImportError(f"response cache {url}: the Redis store needs the 'redis' package "
                              "(pip install 'nanoseek[cache]')") from e
        self.url, self.ttl, self.max_entries, self.clock = url, ttl, max_entries, clock
        self.prefix = prefix
        self._db = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self._db.ping()  # fail at start-up, naming the URL, not on the first request
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

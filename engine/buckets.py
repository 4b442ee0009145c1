"""Size-bounded buckets: the one grouping rule behind every bucketed collective (the dp reducer's
all-reduces, ZeRO-1's broadcasts, ZeRO-2's reduce-scatters and all-gathers)."""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

T = TypeVar("T")


def size_buckets(items: Iterable[T], *, key: Callable[[T], Hashable], nbytes: Callable[[T], int],
                 bucket_bytes: int) -> list[tuple[Hashable, list[T]]]:
    """Group ``items``, in their order, into (key, items) buckets of one ``key`` each (a dtype, a
    device, an owner) holding up to ``bucket_bytes``; an item larger than that gets a bucket of its
    own. One bucket per key is open at a time; buckets are listed in the order they were opened, so
    every rank that walks the same items gets the same buckets in the same order."""
    buckets: list[tuple[Hashable, list[T]]] = []
    sizes: list[int] = []
    open_bucket: dict[Hashable, int] = {}
    for item in items:
        k, n = key(item), nbytes(item)
        b = open_bucket.get(k)
        if b is None or (sizes[b] and sizes[b] + n > bucket_bytes):
            b = open_bucket[k] = len(buckets)
            buckets.append((k, []))
            sizes.append(0)
        buckets[b][1].append(item)
        sizes[b] += n
    return buckets

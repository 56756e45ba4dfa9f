"""Randomness keyed by item, never by processing order: every draw for an item comes from
a generator seeded by a hash of (seed, item key).

Per-item draws are a handful of scalars, so Python's `random.Random` (Mersenne Twister,
stable for a given Python version, which constraints and pyproject pin) is used: creating
one costs microseconds where a numpy Generator costs tens.
"""

from __future__ import annotations

import random

import blake3


def _key_int(seed: int, key: str) -> int:
    return int.from_bytes(blake3.blake3(f"{seed}\0{key}".encode()).digest(length=8), "big")


def item_rng(seed: int, key: str) -> random.Random:
    return random.Random(_key_int(seed, key))


def item_uniform(seed: int, key: str) -> float:
    """A stable number in [0, 1) for (seed, key)."""
    return _key_int(seed, key) / 2**64

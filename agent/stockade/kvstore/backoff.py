"""Retry delays: 0.2 s doubling to 5 s, with jitter so that a fleet does not retry in step."""
from __future__ import annotations

import random


class Backoff:
    def __init__(self, first: float = 0.2, most: float = 5.0):
        self.first, self.most = first, most
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.most, self._next * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first

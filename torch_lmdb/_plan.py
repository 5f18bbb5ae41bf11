"""A rank's batches of an epoch (stream.h's rank plan), each computed when asked.

``RankPlan(n, batch_size, rank, world_size, start, drop_last)`` unpacks as
``_C.rank_plan``'s ``(first, count, position_after, pad_index)``, but its
columns are lazy sequences: starting or resuming an epoch of 1e8 positions
costs the same as one of 1e3 (nothing of the size of the epoch is built).
"""
from typing import Iterator

from torch_lmdb import _C

__all__ = ["RankPlan"]


class _Column:
    def __init__(self, plan: "RankPlan", column: int):
        self._plan, self._column = plan, column

    def __len__(self) -> int:
        return self._plan.size

    def __getitem__(self, k: int) -> int:
        if k < 0:
            k += self._plan.size
        return _C.rank_batch(*self._plan.args, k)[self._column]

    def __iter__(self) -> Iterator[int]:
        return (self[k] for k in range(self._plan.size))


class RankPlan:
    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, start: int, drop_last: bool):
        self.args = (n, batch_size, rank, world_size, start, drop_last)
        self.size = _C.rank_batches(*self.args)

    def __iter__(self):
        pad_index = _C.rank_batch(*self.args, self.size - 1)[3] if self.size else 0
        return iter((_Column(self, 0), _Column(self, 1), _Column(self, 2), pad_index))

    def __getitem__(self, i: int):
        return tuple(self)[i]

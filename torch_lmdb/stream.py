"""BatchIterator (``LMDBDataset.iter_batches``): the batches of one epoch read
ahead by a C++ ``BatchStream``; and what every resumable epoch shares with it
(``make_loader``, ``Mixture``): the rank and seed defaults and the state dict."""
import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from torch_lmdb import _C
from torch_lmdb._collate import _with_lengths

__all__ = ["BatchIterator"]


def _rank_and_world(rank: Optional[int], world_size: Optional[int]):
    """(rank, world_size): the given ones, else torch.distributed's when it is
    initialised, else (0, 1). ValueError for a rank outside [0, world_size)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, "
                         f"world_size={world_size}")
    return rank, world_size


def _draw_seed(seed: Optional[int], generator: Optional[torch.Generator], world_size: int) -> int:
    """The order's seed: ``seed``; else 0 with several ranks (they must all draw
    the same order, as DistributedSampler's default seed); else a draw from
    ``generator`` or torch's global generator."""
    if seed is None:
        if world_size > 1:
            return 0
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed & (2**64 - 1)


# The keys of a loader's and a stream's state_dict() (spelled here only).
SEED_KEY = "seed"
EPOCH_KEY = "epoch"
POSITION_KEY = "position"
NUM_SAMPLES_KEY = "num_samples"
ORDER_KEY = "order"
BATCH_SIZE_KEY = "batch_size"
WORLD_SIZE_KEY = "world_size"
_REQUIRED_STATE_KEYS = (SEED_KEY, EPOCH_KEY, POSITION_KEY, NUM_SAMPLES_KEY)


def _make_state(seed: int, epoch: int, position: int, num_samples: int, order: str, batch_size: int,
                world_size: int) -> Dict[str, Any]:
    return {SEED_KEY: seed, EPOCH_KEY: epoch, POSITION_KEY: position, NUM_SAMPLES_KEY: num_samples,
            ORDER_KEY: order, BATCH_SIZE_KEY: batch_size, WORLD_SIZE_KEY: world_size}


def _state_int(state: Dict[str, Any], key: str, low: int, high: int, what: str) -> int:
    """state[key] as an int in [low, high]; ValueError naming the key for
    anything else (bool, float, str, None: never converted)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise ValueError(f"{what} state['{key}'] must be an int from {low} to {high}, got {value!r}")
    return int(value)


def _check_state(state: Dict[str, Any], num_samples: int, order: str, what: str) -> "tuple[int, int, int]":
    """Checks a state_dict() against this loader or stream: every key's type
    and range, the sample count and the order kind. Returns (seed, epoch,
    position). ValueError naming the key."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} state must be a dict (as state_dict() returns), got {type(state).__name__}")
    missing = [key for key in _REQUIRED_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"{what} state has no '{missing[0]}' (got keys {sorted(map(str, state))})")
    seed = _state_int(state, SEED_KEY, 0, 2**64 - 1, what)
    epoch = _state_int(state, EPOCH_KEY, 0, 2**63 - 1, what)
    saved_for = _state_int(state, NUM_SAMPLES_KEY, 0, 2**63 - 1, what)
    if saved_for != num_samples:
        raise ValueError(f"{what} state['{NUM_SAMPLES_KEY}']: it was saved for {saved_for} samples, this "
                         f"dataset has {num_samples}")
    position = _state_int(state, POSITION_KEY, 0, num_samples, what)
    for key in (BATCH_SIZE_KEY, WORLD_SIZE_KEY):  # informative (any batch size or world size resumes)
        if key in state:
            _state_int(state, key, 1, 2**63 - 1, what)
    saved_order = state.get(ORDER_KEY, order)
    if not isinstance(saved_order, str):
        raise ValueError(f"{what} state['{ORDER_KEY}'] must be a str, got {saved_order!r}")
    if saved_order != order:
        raise ValueError(f"{what} state['{ORDER_KEY}'] was saved with order {saved_order!r}, this loader uses "
                         f"{order!r}")
    return seed, epoch, position


class BatchIterator:
    """The batches of one epoch of a BatchStream (``ds.iter_batches``);
    ``len()`` is the number of batches. Dropping it (or breaking out of the
    loop) stops the reader threads.

    ``state_dict()`` is a small JSON-able dict (seed, epoch, global position,
    sample count, order); ``load_state_dict(state)`` restarts the stream at
    that position (any rank and world size: the rest of the epoch is split
    across the new ranks). Batches the threads read ahead are not counted."""

    def __init__(self, reader, options: Dict[str, Any], start: int = 0, padded: Sequence[str] = ()):
        self._reader = reader
        self._padded = list(padded)
        self._options = dict(options)
        self._order_name = _order_name(options["order"], options["block_size"], options["window_blocks"])
        self._start(start)

    def _start(self, start: int) -> None:
        self._stream = None  # joins the previous stream's threads first
        self._stream = _C.BatchStream(self._reader, start=start, **self._options)
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        batch = None if self._done else self._stream.next()
        if batch is None:
            self._done = True
            raise StopIteration
        return _with_lengths(batch, self._padded)

    def __len__(self) -> int:
        return len(self._stream)

    def batch_indices(self, k: int) -> List[int]:
        """The sample indices of batch ``k`` of this epoch (from its start)."""
        return self._stream.batch_indices(k)

    @property
    def position(self) -> int:
        """Global position after the batches returned so far."""
        return self._stream.position()

    def state_dict(self) -> Dict[str, Any]:
        o = self._options
        return _make_state(o["seed"], o["epoch"], self._stream.position(), self._stream.num_samples(),
                           self._order_name, o["batch_size"], o["world_size"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restarts the stream at ``state``'s position. ValueError naming the
        key for a value of the wrong type or range, or a state saved for
        another sample count or order."""
        seed, epoch, position = _check_state(state, self._stream.num_samples(), self._order_name, "iter_batches")
        self._options["seed"], self._options["epoch"] = seed, epoch
        self._start(position)


def _order_name(order: str, block_size: int, window_blocks: int) -> str:
    return f"block:{block_size}:{window_blocks}" if order == "block" else order

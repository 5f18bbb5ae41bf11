"""make_loader and LMDBLoader: a DataLoader on the batched path, one rank's
batches of seeded epochs, resumable mid-epoch."""
import collections
import weakref
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.utils.data

from torch_lmdb import _C
from torch_lmdb import _plan
from torch_lmdb.dataset import LMDBDataset
from torch_lmdb.stream import _check_state, _draw_seed, _make_state, _order_name, _rank_and_world

__all__ = ["LMDBLoader", "make_loader"]


class _EpochBatchSampler:
    """Index lists of one rank's batches of the loader's current epoch. Holds
    its loader weakly: no reference cycle, so a dropped loader (and its
    persistent workers) goes at once, not at the next garbage collection."""

    def __init__(self, loader: "LMDBLoader"):
        self._loader = weakref.ref(loader)

    def __len__(self) -> int:
        loader = self._loader()
        return len(loader._plan(loader._start)[0])

    def __iter__(self):
        loader = self._loader()
        first, count, _, pad_index = loader._current_plan
        order = loader._current_order
        for f, c in zip(first, count):
            if c == 0:  # an empty share of a tail smaller than the world (stream.h)
                batch = [int(order[pad_index]) if order is not None else pad_index]
            elif order is None:
                batch = list(range(f, f + c))
            else:
                batch = order[f:f + c].tolist()
            if loader._request is None:
                yield batch
                continue
            request = loader._request(batch, loader._tl_seed, loader._tl_epoch, loader._tl_order)
            loader._pending.append(request)  # batches come back in order: _generate finishes them
            yield request


class LMDBLoader(torch.utils.data.DataLoader):
    """A DataLoader of one rank's batches of seeded epochs, with exact resumption.

    Made by :func:`make_loader`. Iterating runs the current epoch from its
    start position; finishing it advances the epoch by one (``set_epoch(e)``
    selects one, as DistributedSampler's). ``state_dict()`` /
    ``load_state_dict()`` as torchdata's StatefulDataLoader: the state counts
    the batches this loader *yielded* (not those its workers read ahead) and
    is a small JSON-able dict ``{"seed", "epoch", "position", "num_samples",
    "order", "batch_size", "world_size"}``; ``position`` is global (samples of
    the epoch's order consumed by all ranks together), so a state saved on
    any rank of a DDP run (ranks advance in step) resumes on any world size:
    the rest of the epoch is re-split so every sample not yet seen is seen
    exactly once. Resuming re-draws the order and starts at the position:
    nothing is read or replayed. A state taken after an epoch's last batch is
    the next epoch's start.
    """

    def __init__(self, dataset, batch_size: int, order: str, seed: int, rank: int, world_size: int,
                 drop_last: bool, block_size: int, window_blocks: int, **kwargs):
        self._tl_batch_size = batch_size
        self._tl_order = order
        self._tl_order_name = _order_name(order, block_size, window_blocks)
        self._tl_block = (block_size, window_blocks)
        self._tl_seed = seed
        self._tl_rank, self._tl_world = rank, world_size
        self._tl_drop_last = drop_last
        self._tl_epoch = 0
        self._start = 0
        self._yielded = 0
        self._running = False
        self._loaded = False  # a load_state_dict() position no iteration has started from yet
        self._current_plan = None
        self._current_order = None
        # A dataset that draws its own order from (seed, epoch) (a Mixture) turns
        # each batch of global positions into its own request.
        self._request = getattr(dataset, "_loader_request", None)
        self._finish = getattr(dataset, "_loader_finish", None)  # (batch, request) -> batch, in this process
        self._pending = collections.deque()
        super().__init__(dataset, batch_size=None, sampler=_EpochBatchSampler(self), **kwargs)

    def _plan(self, start: int):
        return _plan.RankPlan(len(self.dataset), self._tl_batch_size, self._tl_rank, self._tl_world, start,
                              self._tl_drop_last)

    def _order(self):
        n = len(self.dataset)
        if self._tl_order == "sequential" or self._request is not None:
            return None
        return _C.sample_order(n, self._tl_order, _C.epoch_seed(self._tl_seed, self._tl_epoch), *self._tl_block)

    def __iter__(self):
        self._current_plan = self._plan(self._start)
        self._current_order = self._order()
        self._yielded = 0
        self._running = True
        self._loaded = False
        self._pending.clear()
        return self._generate(super().__iter__())

    def _generate(self, batches):
        for batch in batches:
            if self._request is not None:
                request = self._pending.popleft()
                batch = batch if self._finish is None else self._finish(batch, request)
            self._yielded += 1
            yield batch
        self._running = False
        self._tl_epoch += 1
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects epoch ``epoch`` from its start (like DistributedSampler.set_epoch),
        except the epoch of a state loaded since the last iteration began: that
        keeps the state's position, so ``for epoch in range(loader.epoch, n):
        loader.set_epoch(epoch)`` after ``load_state_dict`` continues mid-epoch."""
        if not (self._loaded and epoch == self._tl_epoch):
            self._tl_epoch = int(epoch)
            self._start = 0
            self._loaded = False
        self._running = False

    @property
    def epoch(self) -> int:
        return self._tl_epoch

    def state_dict(self) -> Dict[str, Any]:
        epoch, position = self._tl_epoch, self._start
        if self._running:
            first, _, after, _ = self._current_plan
            if self._yielded == len(first):
                epoch, position = epoch + 1, 0  # the epoch's last batch was yielded
            elif self._yielded > 0:
                position = after[self._yielded - 1]
        return _make_state(self._tl_seed, epoch, position, len(self.dataset), self._tl_order_name,
                           self._tl_batch_size, self._tl_world)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues from ``state`` at the next iteration (see the class doc).
        ValueError naming the key for a value of the wrong type or range, or a
        state saved for another sample count or order."""
        self._tl_seed, self._tl_epoch, self._start = _check_state(state, len(self.dataset), self._tl_order_name,
                                                                  "make_loader")
        self._running = False
        self._loaded = True


class _PadView(torch.utils.data.Dataset):
    """An LMDBDataset whose index lists are read with make_loader's ``pad``
    and ``pad_value`` (the dataset itself, refresh() included, stays shared)."""

    def __init__(self, dataset: LMDBDataset, pad, pad_value):
        if not isinstance(dataset, LMDBDataset):
            raise TypeError(f"make_loader's pad and pad_value need an LMDBDataset, got {type(dataset).__name__}")
        if pad is not None:
            dataset._pad_args(pad)  # unknown names: ValueError now
        self.dataset, self.pad, self.pad_value = dataset, pad, pad_value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        return self.dataset.get_batch(indices, self.pad, self.pad_value)


def make_loader(dataset: LMDBDataset, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None,
                rank: Optional[int] = None, world_size: Optional[int] = None, block_size: Optional[int] = None,
                window_blocks: int = 4, pad: Union[None, bool, Sequence[str]] = None,
                pad_value: Optional[float] = None, **kwargs) -> LMDBLoader:
    """A DataLoader on the batched path, split across ranks, resumable mid-epoch.

    A batch sampler hands whole index lists to ``dataset[indices]`` (one C++
    call per batch, shared-memory batches in workers). ``kwargs`` go to
    DataLoader (num_workers, persistent_workers, multiprocessing_context,
    pin_memory, ...).

    Each epoch has one global order, a function of ``(seed, epoch, len)``
    (the order BatchStream and the C++ loader draw). It is consumed in global
    steps of ``batch_size * world_size`` samples, rank r taking the r-th
    ``batch_size`` slice of each step. The remainder (the last, partial step)
    is split into ``world_size`` contiguous parts whose sizes differ by at
    most one, one last batch per rank; if it holds fewer samples than there
    are ranks, a rank left without one gets one sample repeated from the
    start of the order. So all ranks have the same number of batches and
    every sample is seen exactly once per epoch over all ranks (the
    repetition aside); ``drop_last`` skips the remainder instead.

    Args:
        dataset: an :class:`LMDBDataset` (or any dataset taking index lists).
        batch_size: samples per batch and rank.
        shuffle: a new random order each epoch (else sequential).
        drop_last: skip each epoch's last, partial global step.
        generator: draws the seed when ``seed`` is None.
        seed: the orders' seed; ``None`` draws one from ``generator`` (or
            torch's global generator) in a single process, and is 0 with
            several ranks (all ranks must draw the same order).
        rank, world_size: default to torch.distributed's when it is
            initialised, else 0 and 1.
        block_size, window_blocks: with ``shuffle``, shuffle blocks of
            ``block_size`` consecutive samples (see ``iter_batches``).
        pad, pad_value: as in :meth:`LMDBDataset.get_batch` (default: the
            dataset's own); padded fields carry ``<name>_lengths`` in every batch.

    Returns:
        An :class:`LMDBLoader` (a DataLoader with ``set_epoch``,
        ``state_dict`` and ``load_state_dict``).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    rank, world_size = _rank_and_world(rank, world_size)
    if pad is not None or pad_value is not None:
        dataset = _PadView(dataset, pad, pad_value)
    order = ("block" if block_size else "shuffle") if shuffle else "sequential"
    seed = _draw_seed(seed, generator, world_size) if shuffle else (seed or 0) & (2**64 - 1)
    return LMDBLoader(dataset, batch_size, order, seed, rank, world_size, drop_last, block_size or 1024,
                      window_blocks, **kwargs)

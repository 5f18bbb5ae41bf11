"""Datasets that live elsewhere: a shard directory at an ``http://``,
``https://`` or ``s3://`` URL, or on a shared file system, read through a
node-local cache (README "Remote and shared storage").

The staging itself (fetching, hashing, locks, eviction) is the C++
``ShardCache`` (csrc/torch_lmdb/detail/stage.h), shared with the C++ Reader. This
module decides how a dataset uses it:

- When ``cache_limit`` holds the whole dataset (or is None), every shard is
  staged at open and the dataset is an ordinary :class:`LMDBDataset` over the
  local copies: every feature works, and later epochs read at local speed.
- Otherwise the dataset is a :class:`ShardWindowDataset`: epochs visit the
  shards a window at a time (``shard_window`` shards, their samples shuffled
  together; the windows' order shuffled too), fetching the next shards ahead
  (``predownload``), so the cache holds about two windows. ``make_loader``
  and ``iter_batches`` follow the windows; random access (``ds[i]``) works
  but fetches the shard of each sample it reaches.
"""
import collections
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.data

from torch_lmdb import _C, _plan
from torch_lmdb._renamed import renamed_keywords
from torch_lmdb.dataset import LMDBDataset, _fork_generation_now
from torch_lmdb.stream import _check_state, _draw_seed, _make_state, _rank_and_world

__all__ = ["ShardWindowDataset", "ShardWindowSampler", "default_cache_dir", "parse_cache_limit", "shard_window_order"]


def default_cache_dir() -> str:
    """``$TORCH_LMDB_CACHE``, else ``$XDG_CACHE_HOME/torch_lmdb``, else ``~/.cache/torch_lmdb``."""
    if os.environ.get("TORCH_LMDB_CACHE"):
        return os.environ["TORCH_LMDB_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "torch_lmdb")


def parse_cache_limit(limit: Union[None, int, str]) -> Optional[int]:
    """Bytes from an int or a text such as ``"20GB"`` or ``"512MiB"`` (None: no limit)."""
    if limit is None:
        return None
    if isinstance(limit, bool):
        raise TypeError(f"cache_limit must be bytes (an int) or a size such as '20GB', got {limit!r}")
    if isinstance(limit, int):
        if limit <= 0:
            raise ValueError(f"cache_limit must be positive, got {limit}")
        return limit
    if isinstance(limit, str):
        value = _C.parse_bytes(limit)
        if value <= 0:
            raise ValueError(f"cache_limit must be positive, got {limit!r}")
        return value
    raise TypeError(f"cache_limit must be bytes (an int) or a size such as '20GB', got {type(limit).__name__}")


def is_remote(paths, cache_dir) -> bool:
    """Whether LMDBDataset(paths, cache_dir=...) stages its data."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    try:
        names = [os.fspath(p) for p in paths]
    except TypeError:
        return False
    return cache_dir is not None or any(isinstance(p, str) and _C.is_url(p) for p in names)


class _Spec:
    """What a process needs to open the cache of a dataset (pickled to workers)."""

    def __init__(self, source: str, cache_dir: Optional[str], cache_limit, transfers: int = 4):
        if not isinstance(source, str):
            raise TypeError(f"a staged dataset's path must be a str, got {type(source).__name__}")
        self.source = source
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_limit = parse_cache_limit(cache_limit)
        self.transfers = transfers

    def open(self):
        return _C.ShardCache(self.source, self.cache_dir, self.cache_limit or 0, transfers=self.transfers)


def _single_source(paths) -> str:
    if isinstance(paths, (str, bytes, os.PathLike)):
        return os.fspath(paths)
    paths = list(paths)
    if len(paths) != 1:
        raise ValueError(f"a dataset read through a cache is one shard directory or URL, got {len(paths)} paths "
                         f"(make one dataset per source and combine them with torch_lmdb.Mixture)")
    return os.fspath(paths[0])


def stage_whole(paths, cache_dir, cache_limit) -> Tuple[Optional[_Spec], Any, Optional[str]]:
    """For LMDBDataset: (spec, cache, local mirror) when the dataset is staged
    whole, (spec, cache, None) when it needs a shard window, (None, None, None)
    when it is a plain local dataset."""
    if not is_remote(paths, cache_dir):
        return None, None, None
    spec = _Spec(_single_source(paths), cache_dir, cache_limit)
    cache = spec.open()
    if spec.cache_limit is not None and cache.total_bytes() > spec.cache_limit:
        return spec, cache, None
    cache.acquire_all()
    return spec, cache, cache.local_dir


def choose_window(sizes: Sequence[int], limit: int, shard_window: Optional[int], predownload: Optional[int],
                  source: str) -> Tuple[int, int]:
    """(shard_window, predownload) for a cache of `limit` bytes. The cache
    must hold two windows (a batch that straddles them holds both): the
    largest 2 * shard_window shards; ValueError naming that minimum. The rule
    is the C++ loader's (csrc/torch_lmdb/detail/windows.h)."""
    if shard_window is not None and (isinstance(shard_window, bool) or not isinstance(shard_window, int)
                                     or shard_window < 1):
        raise ValueError(f"shard_window must be a positive int, got {shard_window!r}")
    if predownload is not None and (isinstance(predownload, bool) or not isinstance(predownload, int)
                                    or predownload < 0):
        raise ValueError(f"predownload must be an int >= 0, got {predownload!r}")
    return tuple(_C.choose_shard_window([int(s) for s in sizes], int(limit), shard_window or 0,
                                        -1 if predownload is None else predownload, source))


def shard_window_order(counts: Sequence[int], window: int, seed: int, shuffle: bool = True
                       ) -> Tuple[torch.Tensor, List[int]]:
    """An epoch's order over shards of ``counts`` samples: (sample indices,
    shard visiting order). With ``shuffle``, the shards are visited in a
    random order, ``window`` at a time, each window's samples shuffled
    together; else every sample in order. Deterministic in ``seed`` (torch's
    CPU generator), the same on every rank and in the C++ loader."""
    order, visit = _C.shard_window_order([int(c) for c in counts], int(window), int(seed) & (2**64 - 1),
                                         bool(shuffle))
    return order, list(visit)


class ShardWindowDataset(LMDBDataset):
    """An :class:`LMDBDataset` over a staged dataset larger than its cache
    (what ``LMDBDataset(url, cache_dir=..., cache_limit=...)`` returns then).

    Epochs of :func:`make_loader` and :meth:`iter_batches` visit the shards a
    window at a time (see :func:`shard_window_order`; ``make_loader``'s
    ``shuffle`` draws it, ``block_size`` does not apply). Each process holds
    the shards of the windows it reads (a lease: never evicted while held),
    releases them when it moves on, and fetches the next ``predownload``
    shards of the epoch ahead. ``ds[i]`` and ``get_batch`` work for any index
    (fetching its shard when it is not cached). Selections, ``select``,
    ``filter`` and ``refresh`` need the whole dataset staged (a cache_limit
    of at least its size)."""

    def __init__(self, paths, *args, cache_dir=None, cache_limit=None, predownload: Optional[int] = None,
                 shard_window: Optional[int] = None, **kwargs):
        if kwargs.get("selection") is not None:
            raise ValueError("selection= needs the whole dataset in the cache: give a cache_limit of at least its "
                             "size")
        self._spec = _Spec(_single_source(paths), cache_dir, cache_limit)
        cache = self._spec.open()
        self._shards = cache.shards()
        sizes = [s["size"] for s in self._shards]
        self._window, self._predownload = choose_window(sizes, self._spec.cache_limit, shard_window, predownload,
                                                        self._spec.source)
        self._counts = [s["num_samples"] for s in self._shards]
        self._offsets = [0]
        for c in self._counts:
            self._offsets.append(self._offsets[-1] + c)
        first = cache.acquire(0)
        kwargs = dict(kwargs, lock=False)  # staged copies open without a lock file, here as in _sub
        try:
            super().__init__(first, *args, **kwargs)  # checks every argument; the schema of shard 0
        finally:
            self._handle = None
            cache.release(0, unread=True)  # kept for its window, as a shard fetched ahead
        self._sub_args = (args, {k: v for k, v in kwargs.items() if k not in ("transform", "selection")})
        self._sub_args[1]["lock"] = False
        self._len = self._offsets[-1]
        self._paths = [self._spec.source]
        self._proc = None
        self._proc_state(cache)

    # -- this process's cache, leases and open shards --------------------------
    def _proc_state(self, cache=None) -> Dict[str, Any]:
        gen = _fork_generation_now()
        if self._proc is None or self._proc["generation"] != gen:
            self._proc = {"generation": gen, "cache": cache if cache is not None else self._spec.open(),
                          "subs": collections.OrderedDict(), "orders": {}}
        return self._proc

    def __getstate__(self):
        state = super().__getstate__()
        state["_proc"] = None
        return state

    def _sub(self, k: int, keep: Sequence[int] = ()) -> LMDBDataset:
        """Shard k's dataset, staged and held; at most shard_window shards held
        besides `keep` (the least recently used are released first)."""
        p = self._proc_state()
        subs = p["subs"]
        if k in subs:
            subs.move_to_end(k)
            return subs[k]
        for old in [s for s in subs if s not in keep][: max(0, len(subs) + 1 - self._window)]:
            self._drop(old)
        local = p["cache"].acquire(k)
        try:
            sub = LMDBDataset(local, *self._sub_args[0], **self._sub_args[1])
        except BaseException:
            p["cache"].release(k)
            raise
        subs[k] = sub
        return sub

    def _drop(self, k: int) -> None:
        p = self._proc_state()
        sub = p["subs"].pop(k, None)
        if sub is not None:
            sub.close()
            del sub
            p["cache"].release(k)

    def close(self) -> None:
        """Releases every shard this process holds (they may then be evicted)."""
        if self._proc is not None and self._proc["generation"] == _fork_generation_now():
            for k in list(self._proc["subs"]):
                self._drop(k)

    def _shard_of(self, index: int) -> Tuple[int, int]:
        import bisect

        k = bisect.bisect_right(self._offsets, index) - 1
        return k, index - self._offsets[k]

    # -- access ---------------------------------------------------------------
    def __getitem__(self, index):
        if isinstance(index, tuple) and len(index) == 4:  # make_loader's request (see _loader_request)
            positions, seed, epoch, shuffle = index
            return self._read_positions(positions, seed, epoch, shuffle)
        batched = type(index) is not int and (
            isinstance(index, (list, tuple)) or (isinstance(index, torch.Tensor) and index.dim() == 1))
        if batched:
            return self.get_batch(index)
        k, local = self._shard_of(self._index(index))
        sample = self._sub(k)._reader().get(local)
        return self.transform(sample) if self.transform is not None else sample

    def get_batch(self, indices: Sequence[int], pad=None, pad_value: Optional[float] = None,
                  _keep: Sequence[int] = ()) -> Dict[str, Any]:
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        idx = [self._index(i) for i in indices]
        pad = self._pad if pad is None else pad
        pad_value = self._pad_value if pad_value is None else pad_value
        groups: Dict[int, List[int]] = collections.OrderedDict()
        where = []
        for j, i in enumerate(idx):
            k, local = self._shard_of(i)
            groups.setdefault(k, []).append(j)
            where.append(local)
        keep = list(_keep) + list(groups)
        if len(groups) == 1:
            (k, js), = groups.items()
            return self._sub(k, keep).get_batch([where[j] for j in js], pad, pad_value)
        parts, order = [], []
        for k, js in groups.items():
            parts.append(self._sub(k, keep).get_batch([where[j] for j in js], pad, pad_value))
            order.extend(js)
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order), dtype=torch.int64)
        try:
            out: Dict[str, Any] = {}
            for name, first in parts[0].items():
                if isinstance(first, torch.Tensor):
                    out[name] = torch.cat([p[name] for p in parts]).index_select(0, inverse)
                else:
                    merged = [v for p in parts for v in p[name]]
                    out[name] = [merged[i] for i in inverse.tolist()]
            return out
        except RuntimeError:  # shapes differ between the shards' parts (padded fields): per sample
            samples = [self._sub(self._shard_of(i)[0], keep)._reader().get(self._shard_of(i)[1]) for i in idx]
            return self._collate_padded(samples, pad, pad_value)

    def _collate_padded(self, samples, pad, pad_value) -> Dict[str, Any]:
        saved = (self._pad, self._pad_value)
        self._pad, self._pad_value = pad, pad_value
        try:
            return self.collate(samples)
        finally:
            self._pad, self._pad_value = saved

    # -- epochs in shard windows ----------------------------------------------
    def _epoch(self, seed: int, epoch: int, shuffle: bool):
        """(order, visit, window of each shard) of an epoch, kept per process."""
        p = self._proc_state()
        key = (seed, epoch, shuffle)
        if key not in p["orders"]:
            p["orders"].clear()  # one epoch at a time
            order, visit = shard_window_order(self._counts, self._window, _C.epoch_seed(seed, epoch), shuffle)
            window_of = [0] * len(visit)
            for j, k in enumerate(visit):
                window_of[k] = j // self._window
            p["orders"][key] = (order, visit, window_of)
        return p["orders"][key]

    def _read_positions(self, positions: Sequence[int], seed: int, epoch: int, shuffle: bool,
                        pad=None, pad_value=None) -> Dict[str, Any]:
        """The samples at these positions of an epoch's order, held a window at a
        time, fetching the next `predownload` shards of the epoch ahead."""
        order, visit, window_of = self._epoch(seed, epoch, shuffle)
        positions = list(positions)
        idx = order[torch.tensor(positions, dtype=torch.int64)].tolist() if positions else []
        shards = {self._shard_of(i)[0] for i in idx}
        windows = {window_of[k] for k in shards}
        p = self._proc_state()
        for k in [k for k in p["subs"] if window_of[k] not in windows]:
            self._drop(k)  # a window this process has moved past
        # Every shard of the current windows is held before anything is
        # fetched ahead (what a prefetch may evict is then only what lies
        # behind): fetched together, then leased.
        current = [k for w in sorted(windows) for k in visit[w * self._window:(w + 1) * self._window]]
        missing = [k for k in current if k not in p["subs"]]
        if missing:
            p["cache"].prefetch(missing)
            for k in missing:
                self._sub(k, keep=current)
        last = max(windows) if windows else 0
        ahead = visit[(last + 1) * self._window:(last + 1) * self._window + self._predownload]
        key = (seed, epoch, shuffle, last)
        now = time.monotonic()
        if ahead and (p.get("ahead") != key or now - p.get("ahead_at", 0) > 0.05):
            p["cache"].prefetch(ahead)  # again now and then: one skipped for room fits once the window moves
            p["ahead"], p["ahead_at"] = key, now
        return self.get_batch(idx, pad, pad_value, _keep=current)

    def _loader_request(self, positions: List[int], seed: int, epoch: int, order: str):
        """What make_loader's sampler hands a worker for a batch (loader.py)."""
        if order == "block":
            raise ValueError("block_size does not apply to a dataset read in shard windows (a window of shards is "
                             "its block): call make_loader without block_size")
        return (positions, seed, epoch, order == "shuffle")

    @renamed_keywords(prefetch="batches_ahead")
    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: Optional[int] = None,
                     drop_last: bool = False, batches_ahead: int = 2, threads: int = 1,
                     block_size: Optional[int] = None, window_blocks: int = 4, pad=None,
                     pad_value: Optional[float] = None, *, epoch: int = 0, rank: Optional[int] = None,
                     world_size: Optional[int] = None, start: int = 0) -> "WindowBatchIterator":
        """As :meth:`LMDBDataset.iter_batches`, in shard windows (``block_size``
        does not apply)."""
        if block_size is not None:
            raise ValueError("block_size does not apply to a dataset read in shard windows")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        rank, world_size = _rank_and_world(rank, world_size)
        seed = _draw_seed(seed, None, world_size)
        return WindowBatchIterator(self, batch_size, shuffle, seed, drop_last, pad, pad_value, epoch, rank,
                                   world_size, start)

    def window_sampler(self, shuffle: bool = True, seed: int = 0) -> "ShardWindowSampler":
        """A sampler for the drop-in ``DataLoader(ds, sampler=ds.window_sampler())``:
        the sample indices of each epoch in shard-window order (``set_epoch(e)``
        as DistributedSampler's), so per-sample reads follow the windows too."""
        return ShardWindowSampler(self, shuffle, seed)

    # -- what needs the whole dataset -----------------------------------------
    def _whole(self, what: str):
        raise ValueError(f"{what} needs the whole dataset in the cache: '{self._spec.source}' is read in shard "
                         f"windows (cache_limit {self._spec.cache_limit} bytes < {sum(s['size'] for s in self._shards)}"
                         f" bytes)")

    def select(self, indices, allow_duplicates: bool = False):
        self._whole("select()")

    def filter(self, predicate, fields, name=None, batch_size: int = 65536):
        self._whole("filter()")

    def refresh(self) -> int:
        return self._len  # a published shard directory does not grow

    def io_stats(self) -> Dict[str, Any]:
        """This process's staging counters (bytes_fetched, shards_fetched,
        fetch_seconds, cache_hits, evictions, retries, hash_failures,
        prefetch_skipped, cache_scans) and
        ``cached_bytes`` (the cache directory's staged bytes now)."""
        p = self._proc_state()
        stats = dict(p["cache"].stats())
        stats["cached_bytes"] = p["cache"].cached_bytes()
        return stats

    def reader_count(self, file: int = 0) -> int:
        return -1

    @property
    def shard_window(self) -> int:
        return self._window

    @property
    def cache_dir(self) -> str:
        return self._proc_state()["cache"].local_dir

    def __repr__(self) -> str:
        return (f"ShardWindowDataset({self._spec.source!r}, {self._len} samples, {len(self._shards)} shards, "
                f"shard_window={self._window}, cache_limit={self._spec.cache_limit})")


class WindowBatchIterator:
    """The batches of one epoch of a :class:`ShardWindowDataset` (its
    ``iter_batches``), with ``state_dict()``/``load_state_dict()`` as
    :class:`torch_lmdb.stream.BatchIterator`."""

    def __init__(self, ds: ShardWindowDataset, batch_size, shuffle, seed, drop_last, pad, pad_value, epoch, rank,
                 world_size, start):
        self._ds = ds
        self._args = dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, rank=rank,
                          world_size=world_size)
        self._pad, self._pad_value = pad, pad_value
        self._seed, self._epoch = seed, epoch
        self._order_name = f"shard_window:{ds._window}" if shuffle else "sequential"
        self._restart(start)

    def _restart(self, start: int) -> None:
        a = self._args
        self._start = start
        self._plan = _plan.RankPlan(len(self._ds), a["batch_size"], a["rank"], a["world_size"], start,
                                    a["drop_last"])
        self._k = 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self._plan.size

    def __next__(self) -> Dict[str, Any]:
        if self._k >= self._plan.size:
            raise StopIteration
        first, count, _, pad_index = self._plan
        f, c = first[self._k], count[self._k]
        positions = [pad_index] if c == 0 else list(range(f, f + c))
        batch = self._ds._read_positions(positions, self._seed, self._epoch, self._args["shuffle"], self._pad,
                                         self._pad_value)
        self._k += 1
        return batch

    @property
    def position(self) -> int:
        return self._start if self._k == 0 else self._plan[2][self._k - 1]

    def state_dict(self) -> Dict[str, Any]:
        return _make_state(self._seed, self._epoch, self.position, len(self._ds), self._order_name,
                           self._args["batch_size"], self._args["world_size"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._seed, self._epoch, position = _check_state(state, len(self._ds), self._order_name, "iter_batches")
        self._restart(position)


class ShardWindowSampler(torch.utils.data.Sampler):
    """Sample indices of a :class:`ShardWindowDataset`'s epoch in shard-window
    order (see :meth:`ShardWindowDataset.window_sampler`)."""

    def __init__(self, ds: ShardWindowDataset, shuffle: bool = True, seed: int = 0):
        self._ds, self._shuffle, self._seed, self._epoch = ds, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._ds)

    def __iter__(self):
        order, _ = shard_window_order(self._ds._counts, self._ds._window, _C.epoch_seed(self._seed, self._epoch),
                                      self._shuffle)
        return iter(order.tolist())

"""LMDBDataset: a torch.utils.data.Dataset over torch_lmdb files."""
import gc
import json
import operator
import os
import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.utils.data

from torch_lmdb import _C
from torch_lmdb import selection as _selection
from torch_lmdb._collate import _equal_lengths, _stack, _with_lengths
from torch_lmdb._info import PathLike, check_database_path, info, missing_database  # noqa: F401
from torch_lmdb._renamed import renamed_keywords, spelled
from torch_lmdb._slabs import _worker_get_batch
from torch_lmdb.stream import (  # noqa: F401  (the state keys: importable from here too)
    BATCH_SIZE_KEY,
    EPOCH_KEY,
    NUM_SAMPLES_KEY,
    ORDER_KEY,
    POSITION_KEY,
    SEED_KEY,
    WORLD_SIZE_KEY,
    BatchIterator,
    _draw_seed,
    _rank_and_world,
)

__all__ = ["BatchIterator", "LMDBDataset", "LMDBLoader", "info", "make_loader"]

# Bumped in every child forked by os.fork (multiprocessing, DataLoader
# workers): a dataset's handle belongs to the process that opened it. Cheaper
# than os.getpid() (a syscall) on every access; the C++ Reader also reopens
# its environments after any fork (pthread_atfork), C-level forks included.
_fork_generation = 0
_MAX_READERS = 1 << 20  # 64 bytes of lock file each


_refresh_lock = threading.Lock()  # LMDBDataset.refresh, one at a time per process


def _after_fork_in_child() -> None:
    global _fork_generation, _refresh_lock, _forks_in_flight, _fork_gc_lock
    _refresh_lock = threading.Lock()  # (another thread may have held it at fork)
    _fork_generation += 1
    # Every object the child inherited goes to the collector's permanent
    # generation: a forked DataLoader worker never finalizes its parent's
    # garbage. A DataLoader iterator left in a reference cycle (a traceback, a
    # notebook's history) was otherwise collected in each worker, where its
    # __del__ shut down the parent's workers (setting their done event,
    # writing to their queues) and could wait forever on a lock that another
    # thread of the parent (Dask's profiler and event loop, which collect
    # garbage too) held at fork. Objects the child creates are collected as usual.
    gc.freeze()
    _forks_in_flight, _fork_gc_lock = 0, threading.Lock()  # (only the forking thread lives on)
    if _gc_was_enabled:
        gc.enable()


# The collector is off from just before a fork until the child has frozen what
# it inherited: the at-fork handlers registered before this one (threading's,
# random's, ...) run first in the child and allocate, and a collection there
# would still finalize the parent's garbage. Threads may fork at once: the
# first fork in flight turns the collector off, the last one out restores it.
_gc_was_enabled = True
_forks_in_flight = 0
_fork_gc_lock = threading.Lock()


def _before_fork() -> None:
    global _gc_was_enabled, _forks_in_flight
    with _fork_gc_lock:
        if _forks_in_flight == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _forks_in_flight += 1


def _after_fork_in_parent() -> None:
    global _forks_in_flight
    with _fork_gc_lock:
        _forks_in_flight -= 1
        if _forks_in_flight == 0 and _gc_was_enabled:
            gc.enable()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)

# Reader options renamed (docs/ARCHITECTURE.md, glossary): old keyword -> new, accepted for a release.
_RENAMED_OPTIONS = {"readahead": "os_readahead", "lookahead": "page_requests", "lookahead_bytes": "page_request_bytes"}


def _fork_generation_now() -> int:
    """Changes in every forked child (see _after_fork_in_child)."""
    return _fork_generation


class LMDBDataset(torch.utils.data.Dataset):
    """A map-style dataset over one or several torch_lmdb databases.

    ``ds[i]`` returns a ``dict[str, Tensor | str | bytes]``; ``ds[[i, j, ...]]``
    and :meth:`get_batch` return the batch already stacked, read and collated
    in C++ with the GIL released.

    Safe with every DataLoader start method: the dataset pickles its
    configuration, never its handles, and opens the files lazily in each
    process (a forked worker never reuses the parent's LMDB environment).

    Args:
        paths: a database directory or a list of them (concatenated in order);
            a shard directory (``manifest.json``) stands for its shards.
        transform: callable applied to each sample returned by ``ds[i]``.
        fields: subset of field names to read (KeyError for unknown names);
            a str is one field name.
        verify: check each record's checksum while reading (the default; a
            batch hashes each record while copying it). ``False`` returns a
            record whose bytes were altered in place as stored.
        lock: ``None`` locks but falls back to lock-free reads (with a warning)
            on read-only storage; ``False`` never locks; ``True`` always locks.
        os_readahead: let the operating system read ahead on page faults
            (helps sequential scans of cold data; off: random access).
            Formerly ``readahead`` (still accepted, with a DeprecationWarning).
        page_requests: cold batches (every batched path: ``get_batch``,
            ``ds[list]``, ``iter_batches``, ``make_loader``). A batch that
            requests its pages looks all its samples up first and requests
            every uncached page at once (a deep queue for the device), then
            copies. ``"auto"``: a thread's batches request their pages once
            one of its batches had to wait for the disk, until 4 in a row
            find everything cached; ``"always"``; ``"never"``. Formerly
            ``lookahead``.
        page_request_bytes: at most this many bytes of a batch are requested
            at once (the bound of the reads in flight per reading thread).
            ``iter_batches`` also requests the coming batches' pages while
            it reads, a chunk at a time (a block-shuffle window when it fits
            in ``page_request_bytes``, else half of it), at most two chunks
            ahead: at most ``2 * page_request_bytes``. Formerly
            ``lookahead_bytes``.
        keep_cache: ``False`` reads cold records past the page cache
            (``O_DIRECT``) and drops the pages of the others once copied, so
            an epoch over data larger than RAM does not evict the rest of the
            machine's cache (for every process: use it for data nobody reads
            hot).
        direct_reads: a cold batch reads its uncached records of 4 KiB or
            more through io_uring (``O_DIRECT`` with ``keep_cache=False``)
            instead of faulting them in; ``False``: page requests alone.
        max_readers: LMDB reader-table size (1 to 2**20).
        decode_threads: threads that decompress a ``get_batch``'s compressed
            payloads (the calling thread and helpers; batches whose
            compressed payloads total under 256 KiB decode on the calling
            thread). ``None``: the machine's cores (at most 4) in the
            process that made the dataset's reader, one inside DataLoader
            workers (they already run side by side); ``iter_batches`` and
            ``make_loader`` decode on their reading threads.
        pad: for batches, pad variable-shape fields (True, or a list of names,
            or one name) and add ``<name>_lengths`` (int64 [B, ndim]);
            ValueError for unknown names.
        pad_value: fill value of the padding.
        selection: the name of a selection stored beside the data
            (:meth:`filter` with ``name``, or ``torch-lmdb select``): the
            dataset is then that view (see :meth:`select`).
        cache_dir: where a dataset at an ``http://``, ``https://`` or
            ``s3://`` URL is staged (default ``$TORCH_LMDB_CACHE``, else
            ``~/.cache/torch_lmdb``); given with a local shard directory
            (e.g. on a shared file system), that directory is staged too.
            Each shard is fetched once per node (DataLoader workers and the
            ranks of a node share the cache) and checked against the
            manifest's size and hash. README "Remote and shared storage".
        cache_limit: bytes the cache may hold (an int, or a size such as
            ``"20GB"``; None: no limit). When the dataset fits, every shard
            is staged at open; otherwise the dataset reads in shard windows
            (a :class:`torch_lmdb.remote.ShardWindowDataset`), and a limit
            too small for one window is a ValueError naming the minimum.
        predownload, shard_window: for a dataset read in shard windows:
            shards fetched ahead, and shards whose samples an epoch shuffles
            together (default: the largest window the cache holds twice, with a shard to spare).
    """

    def __new__(cls, *args, **kwargs):
        # A staged dataset larger than its cache is read in shard windows.
        if cls is LMDBDataset and (args or "paths" in kwargs) and kwargs.get("cache_limit") is not None:
            from torch_lmdb import remote

            paths = args[0] if args else kwargs["paths"]
            if remote.is_remote(paths, kwargs.get("cache_dir")):
                spec = remote._Spec(remote._single_source(paths), kwargs.get("cache_dir"), kwargs["cache_limit"])
                if spec.open().total_bytes() > spec.cache_limit:
                    return super().__new__(remote.ShardWindowDataset)
        return super().__new__(cls)

    @renamed_keywords(**_RENAMED_OPTIONS)
    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        transform: Optional[Callable[[Dict[str, Any]], Any]] = None,
        fields: Optional[Sequence[str]] = None,
        verify: bool = True,
        lock: Optional[bool] = None,
        os_readahead: bool = False,
        max_readers: int = 1024,
        page_requests: str = "auto",
        page_request_bytes: int = 128 << 20,
        keep_cache: bool = True,
        direct_reads: bool = True,
        pad: Union[bool, Sequence[str]] = False,
        pad_value: float = 0,
        decode_threads: Optional[int] = None,
        selection: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        cache_limit: Union[None, int, str] = None,
        predownload: Optional[int] = None,
        shard_window: Optional[int] = None,
    ):
        from torch_lmdb import remote

        self._staged = None  # (spec, ShardCache) of a dataset staged whole to a local cache
        spec, cache, local = remote.stage_whole(paths, cache_dir, cache_limit)
        if spec is not None:
            if local is None:
                raise ValueError(f"'{spec.source}' ({cache.total_bytes()} bytes) does not fit cache_limit "
                                 f"{spec.cache_limit}: open it as LMDBDataset(path, cache_dir=..., cache_limit=...) "
                                 f"to read it in shard windows")
            self._staged = (spec, cache)
            paths, lock = [local], False  # the staged copies: read-only, no lock file
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]
        self._paths = [os.fspath(p) for p in paths]
        if not self._paths:
            raise ValueError("LMDBDataset needs at least one path")
        for p in self._paths:
            check_database_path(p)
        self.transform = transform
        if isinstance(max_readers, bool) or not isinstance(max_readers, int) or not 1 <= max_readers <= _MAX_READERS:
            raise ValueError(f"max_readers must be an int from 1 to {_MAX_READERS}, got {max_readers!r}")
        self._fields = [fields] if isinstance(fields, str) else list(fields) if fields is not None else []
        if isinstance(page_request_bytes, bool) or not isinstance(page_request_bytes, int) or page_request_bytes < 0:
            raise ValueError(f"{spelled('page_request_bytes')} must be an int >= 0, got {page_request_bytes!r}")
        if page_requests not in ("auto", "always", "never"):
            raise ValueError(f"{spelled('page_requests')} must be 'auto', 'always' or 'never', "
                             f"got {page_requests!r}")
        if decode_threads is not None and (isinstance(decode_threads, bool) or not isinstance(decode_threads, int)
                                           or not 1 <= decode_threads <= 64):
            raise ValueError(f"decode_threads must be an int from 1 to 64 (or None: automatic), got {decode_threads!r}")
        self._options = dict(verify=verify, lock=lock, os_readahead=os_readahead, max_readers=max_readers,
                             page_requests=page_requests, page_request_bytes=page_request_bytes,
                             keep_cache=bool(keep_cache), direct_reads=bool(direct_reads),
                             decode_threads=decode_threads or 0)
        self._pad = pad
        self._pad_value = pad_value
        self._handle = None
        self._generation = None
        if self._fields:  # checked once here, not on every reopen in a worker
            full = _C.Reader(self._paths, **self._options)
            self._emit_warnings(full)
            names = [f["name"] for f in full.schema()]
            unknown = [f for f in self._fields if f not in names]
            if unknown:
                raise KeyError(f"unknown field(s) {unknown} in '{self._paths[0]}'; available: {names}")
        reader = self._reader()  # validate now: clear errors in the constructor
        self._len = len(reader)
        self._schema = reader.schema()
        self._pad_args(pad)  # unknown pad fields: an error now, not silence later
        self._metadata = [json.loads(reader.metadata_json(i)) for i in range(len(reader.paths))]
        self._selection = None  # sample indices of a view (array('q')), see select()
        self._c_selection = None  # (pid, _C.Selection) of this process
        if selection is not None:
            self._selection = _selection.load_named(self, selection)
            self._len = len(self._selection)

    # -- process lifetime ---------------------------------------------------
    def _reader(self):
        if self._handle is None or self._generation != _fork_generation:
            if self._staged is not None and self._staged[1] is None:  # unpickled in a spawned process
                cache = self._staged[0].open()
                cache.acquire_all()  # held by this process too (found in the node's cache)
                self._staged = (self._staged[0], cache)
            handle = _C.Reader(self._paths, fields=self._fields, **self._options)
            self._emit_warnings(handle)
            self._handle, self._generation = handle, _fork_generation
        return self._handle

    @staticmethod
    def _emit_warnings(handle) -> None:
        for message in handle.take_warnings():
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_generation"] = None
        state["_c_selection"] = None
        if self._staged is not None:
            state["_staged"] = (self._staged[0], None)
        return state

    def __setstate__(self, state):
        # A dataset pickled before the renames names its reader options the old way.
        options = state.get("_options", {})
        for old, new in _RENAMED_OPTIONS.items():
            if old in options:
                options[new] = options.pop(old)
        self.__dict__.update(state)

    def refresh(self) -> int:
        """Makes the samples appended since the dataset opened visible.

        Re-reads each file's sample count (and completeness and metadata), so
        ``len(ds)`` follows a writer that appends, in another process or in
        this one (an :class:`LMDBWriter` and datasets of one path in one
        process share its LMDB environment). Reads keep their snapshot: a
        DataLoader takes the length at the start of each epoch, so call
        ``refresh()`` between epochs; workers then see the new samples (a
        worker given an index past the count it knows refreshes once).

        Returns:
            The new number of samples.
        """
        # One refresh at a time in the process: two threads' handles would
        # otherwise be published in either order (len() going backwards, a
        # length checked against another handle than the one read).
        with _refresh_lock:
            handle = _C.Reader(self._paths, fields=self._fields, **self._options)
            self._emit_warnings(handle)
            metadata = [json.loads(handle.metadata_json(i)) for i in range(len(handle.paths))]
            # The handle before the length: a reader that sees the new length
            # (checked first) then takes a handle that holds it.
            self._handle, self._generation = handle, _fork_generation
            self._len = len(handle) if self._selection is None else len(self._selection)
            self._schema = handle.schema()
            self._metadata = metadata
            return self._len

    def close(self) -> None:
        """Drops this process's handle (the files reopen on next use)."""
        self._handle = None
        self._generation = None

    # -- access ---------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def _index(self, i: Any) -> int:
        """An index (int, numpy integer, 0-dim integer tensor) in [0, len)."""
        if isinstance(i, torch.Tensor) and (i.dim() != 0 or i.is_floating_point() or i.is_complex()):
            raise TypeError(f"dataset indices must be integers or lists of integers, got a tensor of dtype "
                            f"{i.dtype} and shape {list(i.shape)}")
        try:
            index = operator.index(i)
        except TypeError:
            raise TypeError(f"dataset indices must be integers or lists of integers, got {type(i).__name__}") from None
        if index < 0:
            index += self._len
        if index >= self._len and torch.utils.data.get_worker_info() is not None:
            self.refresh()  # a persistent worker behind a refreshed main process
        if not 0 <= index < self._len:
            raise IndexError(f"index {operator.index(i)} out of range for dataset of size {self._len} "
                             f"at '{self._paths[0]}'")
        return index if self._selection is None else self._selection[index]

    def _pad_args(self, pad: Union[bool, str, Sequence[str]]):
        """(pad every field?, names to pad), checking the names against the schema."""
        if isinstance(pad, bool):
            return pad, []
        names = [pad] if isinstance(pad, str) else list(pad)
        available = [f["name"] for f in self._schema]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"pad names unknown field(s) {unknown} in '{self._paths[0]}'; available: {available}")
        return False, names

    def __getitem__(self, index):
        batched = type(index) is not int and (  # a sampler's int index: the common case, checked first
            isinstance(index, (list, tuple))
            or (isinstance(index, torch.Tensor) and index.dim() == 1)
            or (not isinstance(index, torch.Tensor) and hasattr(index, "__array__")
                and getattr(index, "ndim", 0) == 1))
        if batched:
            return self.get_batch(index)
        index = self._index(index)  # first: it may refresh the reader (a persistent worker)
        sample = self._reader().get(index)
        return self.transform(sample) if self.transform is not None else sample

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        """Per-sample dicts for DataLoaders that fetch lists of indices (torch >= 2)."""
        return [self[i] for i in indices]

    def get_batch(self, indices: Sequence[int], pad: Union[None, bool, Sequence[str]] = None,
                  pad_value: Optional[float] = None) -> Dict[str, Any]:
        """Reads ``indices`` and returns them collated: tensors stacked to
        ``[B, ...]`` (padded when asked, with ``<name>_lengths``), str/bytes
        fields as lists. Inside a DataLoader worker the tensors are ordinary
        tensors whose memory is a shared-memory slab the worker recycles once
        neither it nor the process that received the batch holds it (they
        cross to the main process without a copy). ``transform`` is not
        applied. ValueError for unknown ``pad`` names."""
        if isinstance(indices, torch.Tensor):
            if indices.dim() != 1:
                raise TypeError(f"get_batch takes a list or 1-dim tensor of indices, got a tensor of shape "
                                f"{list(indices.shape)}")
            indices = indices.tolist()
        idx = [self._index(i) for i in indices]
        pad_all, pad_fields = self._pad_args(self._pad if pad is None else pad)
        pad_value = self._pad_value if pad_value is None else pad_value
        if torch.utils.data.get_worker_info() is not None:
            batch = _worker_get_batch(self._reader(), idx, pad_all, pad_fields, float(pad_value))
        else:
            batch = self._reader().get_batch(idx, pad_all, pad_fields, float(pad_value), None)
        return _with_lengths(batch, self._padded_fields(pad_all, pad_fields))

    def _padded_fields(self, pad_all: bool, pad_fields: Sequence[str]) -> List[str]:
        """The tensor fields whose batches carry ``<name>_lengths`` in every batch:
        the fields named by ``pad``, or with ``pad=True`` those whose shape varies
        (-1 in the schema). (The C++ batch adds lengths only to a batch whose
        shapes differ; the rest are added here.)"""
        return [f["name"] for f in self._schema if f["kind"] == "tensor"
                and (f["name"] in pad_fields or (pad_all and -1 in f["shape"]))]

    def collate(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """A ``collate_fn`` for the drop-in ``DataLoader(ds, batch_size=B,
        collate_fn=ds.collate)``: collates per-sample dicts (after
        ``transform``) as :meth:`get_batch` does, padding the dataset's ``pad``
        fields (with ``<name>_lengths`` in every batch). Tensors are stacked,
        str/bytes fields become lists, other values go to PyTorch's
        ``default_collate``. ValueError naming the field for shapes that differ
        in a field not padded."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        pad_all, pad_fields = self._pad_args(self._pad)
        padded = set(self._padded_fields(pad_all, pad_fields))
        out: Dict[str, Any] = {}
        for name, first in samples[0].items():
            values = [s[name] for s in samples]
            if isinstance(first, torch.Tensor):
                out[name], lengths = _stack(name, values, pad_all or name in pad_fields, self._pad_value)
                if lengths is not None or name in padded:
                    out[name + "_lengths"] = lengths if lengths is not None else _equal_lengths(out[name])
            elif isinstance(first, (str, bytes)):
                out[name] = values
            else:
                out[name] = torch.utils.data.default_collate(values)
        return out

    @renamed_keywords(prefetch="batches_ahead")
    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: Optional[int] = None,
                     drop_last: bool = False, batches_ahead: int = 2, threads: int = 1,
                     block_size: Optional[int] = None, window_blocks: int = 4,
                     pad: Union[None, bool, Sequence[str]] = None,
                     pad_value: Optional[float] = None, *, epoch: int = 0, rank: Optional[int] = None,
                     world_size: Optional[int] = None, start: int = 0) -> "BatchIterator":
        """Yields the collated batches of one epoch, read ahead by C++ threads.

        The fast path in a single process (``num_workers=0``): ``threads``
        C++ threads read up to ``batches_ahead`` batches ahead while your loop
        trains on the current one; no per-sample Python objects, no worker
        processes. Batches are what :meth:`get_batch` returns.

        The epoch's global order is drawn from ``(seed, epoch)`` and split
        across ranks as :func:`make_loader` does (see there). The returned
        iterator has ``state_dict()``/``load_state_dict()``: the position is
        restored directly (nothing is read again).

        Args:
            batch_size: samples per batch.
            shuffle: a random order (else sequential).
            seed: the order's seed; ``None`` draws one from torch's global
                generator (so ``torch.manual_seed`` makes epochs repeatable);
                with several ranks ``None`` means 0 (every rank must draw
                the same order).
            drop_last: skip the last, partial global step.
            batches_ahead: finished batches queued ahead of the loop (bounds
                the memory in flight). Formerly ``prefetch`` (still accepted,
                with a DeprecationWarning).
            threads: reader threads.
            block_size: with ``shuffle``, shuffle blocks of this many
                consecutive samples instead of single samples, mixing samples
                within each window of ``window_blocks`` blocks: reads stay in a
                few key ranges at a time, which keeps data larger than RAM
                fast to read.
            pad, pad_value: as in :meth:`get_batch`.
            epoch: the epoch whose order to read.
            rank, world_size: this process's share (default: torch.distributed's
                when initialised, else 0 and 1).
            start: global position (samples consumed by all ranks) to start at.
        """
        for name, value, low in (("batch_size", batch_size, 1), (spelled("batches_ahead"), batches_ahead, 1),
                                 ("threads", threads, 1),
                                 ("window_blocks", window_blocks, 1), ("block_size", block_size or 1, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rank, world_size = _rank_and_world(rank, world_size)
        seed = _draw_seed(seed, None, world_size)
        order = ("block" if block_size else "shuffle") if shuffle else "sequential"
        pad_all, pad_fields = self._pad_args(self._pad if pad is None else pad)
        pad_value = self._pad_value if pad_value is None else pad_value
        options = dict(batch_size=batch_size, order=order, seed=seed, drop_last=drop_last,
                       batches_ahead=batches_ahead, threads=threads, block_size=block_size or 1024,
                       window_blocks=window_blocks, pad=pad_all, pad_fields=pad_fields, pad_value=float(pad_value), epoch=epoch, rank=rank,
                       world_size=world_size, selection=_selection.c_selection(self))
        return BatchIterator(self._reader(), options, start, self._padded_fields(pad_all, pad_fields))

    # -- views ----------------------------------------------------------------
    def select(self, indices: Sequence[int], allow_duplicates: bool = False) -> "LMDBDataset":
        """A view of this dataset restricted to ``indices`` (its positions, any
        order; a bool mask works too), usable wherever a dataset is. Nothing
        is copied: position p reads sample ``indices[p]``; loaders shuffle,
        split and resume over the view's positions. IndexError for an index
        out of range, ValueError for a duplicate unless ``allow_duplicates``."""
        return _selection.select(self, indices, allow_duplicates)

    def filter(self, predicate: Callable[[Dict[str, Any]], Any], fields: Sequence[str],
               name: Optional[str] = None, batch_size: int = 65536) -> "LMDBDataset":
        """The view of the samples ``predicate`` accepts: it gets batches of
        only ``fields`` (read in C++, ``batch_size`` at a time) and returns a
        bool mask. ``name`` also stores the selection beside the data
        (``<path>/selections/<name>.sel``, checksummed and tied to this data),
        so ``LMDBDataset(path, selection=name)`` opens the view."""
        return _selection.filter_dataset(self, predicate, fields, name, batch_size)

    @property
    def selection(self) -> Optional[torch.Tensor]:
        """The sample indices of this view (None: every sample)."""
        return None if self._selection is None else _selection.as_tensor(self._selection).clone()

    # -- description ----------------------------------------------------------
    @property
    def paths(self) -> List[str]:
        return list(self._paths)

    @property
    def schema(self) -> List[Dict[str, Any]]:
        """Fields as ``{"name", "kind", "dtype", "shape"}`` (-1 = varying dimension)."""
        return [dict(f) for f in self._schema]

    @property
    def metadata(self) -> Dict[str, Any]:
        """The ``meta`` table of the first file (``metadata_of(i)`` for others)."""
        return self._metadata[0]

    def metadata_of(self, file: int) -> Dict[str, Any]:
        return self._metadata[file]

    def io_stats(self) -> Dict[str, int]:
        """This process's read counters: ``batches``, ``page_request_batches``
        (batches that requested their pages at once), ``pages_requested``
        (pages they found uncached), and ``request_pages_calls`` and
        ``pages_requested_ahead`` (``iter_batches`` requesting the coming
        batches' uncached pages while it reads), and ``direct_records``
        (cold records read through io_uring: with O_DIRECT when ``keep_cache=False``),
        ``window_records`` and ``window_bytes`` (a block shuffle's cold
        windows read ahead with a few long reads, and the records batches took
        from them). The old names
        ``lookahead_batches``, ``prefetches`` and ``pages_prefetched`` hold
        the same counts for a release. A dataset staged from a URL or a
        shared file system adds its cache's counters: ``bytes_fetched``,
        ``shards_fetched``, ``fetch_seconds``, ``cache_hits``, ``evictions``,
        ``retries``, ``hash_failures``, ``prefetch_skipped``, ``cache_scans``
        (walks of the cache directory to count its bytes)."""
        stats = dict(self._reader().io_stats())
        if self._staged is not None and self._staged[1] is not None:
            stats.update(self._staged[1].stats())
        return stats

    def reader_count(self, file: int = 0) -> int:
        """LMDB reader-table slots in use (-1 when reading without a lock)."""
        return self._reader().reader_count(file)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f['name']}: {f['dtype']}{f['shape']}" for f in self._schema)
        view = "" if self._selection is None else " selected"
        return f"LMDBDataset({self._paths!r}, {self._len}{view} samples, {{{fields}}})"


def __getattr__(name: str):
    """LMDBLoader and make_loader, importable from here too: they live in
    torch_lmdb.loader, which imports this module, so they load on first use."""
    if name in ("LMDBLoader", "make_loader"):
        from torch_lmdb import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""LMDBDataset: a torch.utils.data.Dataset over torch_lmdb files."""
import collections
import errno
import gc
import json
import math
import numbers
import operator
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.utils.data

from torch_lmdb import _C
from torch_lmdb import _plan
from torch_lmdb import selection as _selection

__all__ = ["BatchIterator", "LMDBDataset", "LMDBLoader", "info", "make_loader"]

PathLike = Union[str, "os.PathLike[str]"]

# Bumped in every child forked by os.fork (multiprocessing, DataLoader
# workers): a dataset's handle belongs to the process that opened it. Cheaper
# than os.getpid() (a syscall) on every access; the C++ Reader also reopens
# its environments after any fork (pthread_atfork), C-level forks included.
_fork_generation = 0
_MAX_READERS = 1 << 20  # 64 bytes of lock file each


_refresh_lock = threading.Lock()  # LMDBDataset.refresh, one at a time per process


def _after_fork_in_child() -> None:
    global _fork_generation, _refresh_lock
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


os.register_at_fork(after_in_child=_after_fork_in_child)


def _alloc_shared(shape: List[int], dtype_name: str) -> torch.Tensor:
    """Allocates a batch tensor in shared memory (used inside DataLoader workers,
    so the batch crosses to the main process without another copy)."""
    dtype = getattr(torch, dtype_name)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype).storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


# Batch tensors travel through recycled slabs (csrc/torch_lmdb/shm_slabs.h),
# small ones too: a fresh shared-memory tensor costs page faults and an fd
# passed over a socket per batch. Inside a worker, ds[list] returns ordinary
# torch.Tensors whose storage is a slab, so collate_fns, wrapper datasets and
# transforms work on them as on any tensor; when such a tensor (or a view of
# it) is pickled to the main process, the reducer below sends a ticket
# (pid, slab, generation, view) instead of its bytes. Every other tensor goes
# through torch's own reducer. A slab is reused only once neither the worker
# nor the process that received it holds a tensor of it (the generation in its
# header makes stale releases harmless; releases happen only in the process
# that made or received the tensor, never in a forked child). When all of a
# worker's slabs are busy, fresh shared memory takes over.
_SLABS_PER_WORKER = 32
_slab_pool = None  # this worker process's pool: (pid, SlabPool)
_torch_reduce_tensor = None  # torch's ForkingPickler reducer of torch.Tensor


def _worker_slabs():
    global _slab_pool
    if _slab_pool is None or _slab_pool[0] != os.getpid():
        _slab_pool = (os.getpid(), _C.SlabPool(_SLABS_PER_WORKER))
        _install_reducer()
    return _slab_pool[1]


def _install_reducer() -> None:
    """Registers _reduce_tensor with ForkingPickler (what DataLoader queues
    pickle with) in this worker, after torch.multiprocessing registered its own."""
    global _torch_reduce_tensor
    import torch.multiprocessing  # noqa: F401  (registers torch's reducers first)
    from multiprocessing.reduction import ForkingPickler

    current = ForkingPickler._extra_reducers.get(torch.Tensor)
    if current is not _reduce_tensor:
        _torch_reduce_tensor = current
        ForkingPickler.register(torch.Tensor, _reduce_tensor)


def _reduce_tensor(tensor: torch.Tensor):
    pool = _slab_pool
    if pool is not None and pool[0] == os.getpid() and not tensor.requires_grad:
        ticket = pool[1].send(tensor)
        if ticket is not None:
            from multiprocessing.reduction import DupFd

            pid, slab, generation, fd, nbytes, sizes, strides, offset, dtype_name = ticket
            fd = DupFd(fd) if fd >= 0 else None  # once per slab
            return (_rebuild_slab_tensor, (pid, slab, generation, fd, nbytes, sizes, strides, offset, dtype_name))
    if _torch_reduce_tensor is None:
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(tensor)
    return _torch_reduce_tensor(tensor)


def _rebuild_slab_tensor(pid, slab, generation, fd, nbytes, sizes, strides, offset, dtype_name):
    """Runs in the receiving (main) process when a worker's batch is unpickled."""
    if fd is not None:
        _C.slab_attach(pid, slab, fd.detach())
    return _C.slab_receive(pid, slab, generation, nbytes, sizes, strides, offset, dtype_name)


def _is_slab_tensor(tensor: Any) -> bool:
    """Whether ``tensor``'s storage is one of this worker's slabs (a diagnostic)."""
    pool = _slab_pool
    return isinstance(tensor, torch.Tensor) and pool is not None and pool[0] == os.getpid() and pool[1].owns(tensor)


def _worker_get_batch(reader, idx, pad_all, pad_fields, pad_value):
    """get_batch inside a DataLoader worker: tensors go into recycled slabs
    (allocated in C++), else into fresh shared memory; nothing is copied again."""
    return reader.get_batch(idx, pad_all, pad_fields, pad_value, _alloc_shared, _worker_slabs())


def _equal_lengths(batch: torch.Tensor) -> torch.Tensor:
    """``<name>_lengths`` (int64 [B, ndim]) of a batch whose samples share one shape."""
    return torch.tensor(batch.shape[1:], dtype=torch.int64).repeat(batch.shape[0], 1)


def _with_lengths(batch: Dict[str, Any], padded: Sequence[str]) -> Dict[str, Any]:
    """``batch`` with ``<name>_lengths`` for every padded field (after its field),
    where the batch's shapes were equal and C++ added none."""
    missing = [name for name in padded if name + "_lengths" not in batch and name in batch]
    if not missing:
        return batch
    out = {}
    for name, value in batch.items():
        out[name] = value
        if name in missing:
            out[name + "_lengths"] = _equal_lengths(value)
    return out


def _stack(name: str, values: List[torch.Tensor], pad: bool, pad_value: float):
    """(batch, lengths or None): ``values`` stacked, padded to the largest
    shape when they differ and ``pad``; lengths only for a padded batch."""
    first = values[0]
    for i, v in enumerate(values):
        if v.dim() != first.dim() or (v.shape != first.shape and not pad):
            raise ValueError(f"field '{name}' has shape {list(v.shape)} in sample {i} of the batch but "
                             f"{list(first.shape)} in sample 0; pass pad=True (or pad=[names]) to the "
                             f"LMDBDataset to pad it")
    if all(v.shape == first.shape for v in values):
        return torch.stack(values), None
    shape = [max(sizes) for sizes in zip(*(v.shape for v in values))]
    out = torch.full([len(values), *shape], pad_value, dtype=first.dtype)
    for slot, v in zip(out, values):
        slot[tuple(slice(0, n) for n in v.shape)] = v
    return out, torch.tensor([list(v.shape) for v in values], dtype=torch.int64).reshape(len(values), first.dim())


def missing_database(path: str, reason: str = "no such file or directory") -> FileNotFoundError:
    """The error for a path that holds no database (``errno`` ENOENT,
    ``filename`` the path): one message for the library and the CLI."""
    return FileNotFoundError(errno.ENOENT, f"no torch_lmdb database ({reason})", path)


def check_database_path(path: str) -> None:
    """FileNotFoundError when nothing exists at ``path``."""
    if not os.path.exists(path):
        raise missing_database(path)


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
        verify: check each record's checksum while reading.
        lock: ``None`` locks but falls back to lock-free reads (with a warning)
            on read-only storage; ``False`` never locks; ``True`` always locks.
        readahead: let the OS read ahead on page faults (helps sequential
            scans of cold data; off: random access).
        lookahead: cold batches (every batched path: ``get_batch``,
            ``ds[list]``, ``iter_batches``, ``make_loader``). A batch that
            looks ahead looks all its samples up first and requests every
            uncached page at once (a deep queue for the device), then copies.
            ``"auto"``: a thread's batches look ahead once one of its batches
            had to wait for the disk, until 4 in a row find everything
            cached; ``"always"``; ``"never"``.
        lookahead_bytes: at most this many bytes of a batch are requested
            ahead (the bound of the reads in flight per reading thread).
            ``iter_batches`` also requests the coming batches' pages while
            it reads, a chunk at a time (a block-shuffle window when it fits
            in ``lookahead_bytes``, else half of it), at most two chunks
            ahead: at most ``2 * lookahead_bytes``.
        keep_cache: ``False`` drops each batch's pages from the page cache
            once copied, so an epoch over data larger than RAM does not
            evict the rest of the machine's cache (for every process: use it
            for data nobody reads hot).
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
    """

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        transform: Optional[Callable[[Dict[str, Any]], Any]] = None,
        fields: Optional[Sequence[str]] = None,
        verify: bool = False,
        lock: Optional[bool] = None,
        readahead: bool = False,
        max_readers: int = 1024,
        lookahead: str = "auto",
        lookahead_bytes: int = 128 << 20,
        keep_cache: bool = True,
        pad: Union[bool, Sequence[str]] = False,
        pad_value: float = 0,
        decode_threads: Optional[int] = None,
        selection: Optional[str] = None,
    ):
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
        if isinstance(lookahead_bytes, bool) or not isinstance(lookahead_bytes, int) or lookahead_bytes < 0:
            raise ValueError(f"lookahead_bytes must be an int >= 0, got {lookahead_bytes!r}")
        if lookahead not in ("auto", "always", "never"):
            raise ValueError(f"lookahead must be 'auto', 'always' or 'never', got {lookahead!r}")
        if decode_threads is not None and (isinstance(decode_threads, bool) or not isinstance(decode_threads, int)
                                           or not 1 <= decode_threads <= 64):
            raise ValueError(f"decode_threads must be an int from 1 to 64 (or None: automatic), got {decode_threads!r}")
        self._options = dict(verify=verify, lock=lock, readahead=readahead, max_readers=max_readers,
                             lookahead=lookahead, lookahead_bytes=lookahead_bytes, keep_cache=bool(keep_cache),
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
        return state

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

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: Optional[int] = None,
                     drop_last: bool = False, prefetch: int = 2, threads: int = 1,
                     block_size: Optional[int] = None, window_blocks: int = 4,
                     pad: Union[None, bool, Sequence[str]] = None,
                     pad_value: Optional[float] = None, *, epoch: int = 0, rank: Optional[int] = None,
                     world_size: Optional[int] = None, start: int = 0) -> "BatchIterator":
        """Yields the collated batches of one epoch, read ahead by C++ threads.

        The fast path in a single process (``num_workers=0``): ``threads``
        C++ threads read up to ``prefetch`` batches ahead while your loop
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
            prefetch: batches read ahead (bounds the memory in flight).
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
        for name, value, low in (("batch_size", batch_size, 1), ("prefetch", prefetch, 1), ("threads", threads, 1),
                                 ("window_blocks", window_blocks, 1), ("block_size", block_size or 1, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rank, world_size = _rank_and_world(rank, world_size)
        seed = _draw_seed(seed, None, world_size)
        order = ("block" if block_size else "shuffle") if shuffle else "sequential"
        pad_all, pad_fields = self._pad_args(self._pad if pad is None else pad)
        pad_value = self._pad_value if pad_value is None else pad_value
        options = dict(batch_size=batch_size, order=order, seed=seed, drop_last=drop_last, prefetch=prefetch,
                       threads=threads, block_size=block_size or 1024, window_blocks=window_blocks, pad=pad_all,
                       pad_fields=pad_fields, pad_value=float(pad_value), epoch=epoch, rank=rank,
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
        """This process's read counters: ``batches``, ``lookahead_batches``
        (batches that requested their pages ahead), ``pages_requested``
        (pages they found uncached), and ``prefetches`` and
        ``pages_prefetched`` (``iter_batches`` requesting the coming batches'
        uncached pages while it reads)."""
        return dict(self._reader().io_stats())

    def reader_count(self, file: int = 0) -> int:
        """LMDB reader-table slots in use (-1 when reading without a lock)."""
        return self._reader().reader_count(file)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f['name']}: {f['dtype']}{f['shape']}" for f in self._schema)
        view = "" if self._selection is None else " selected"
        return f"LMDBDataset({self._paths!r}, {self._len}{view} samples, {{{fields}}})"


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


_BatchIterator = BatchIterator  # the name older code used


def _order_name(order: str, block_size: int, window_blocks: int) -> str:
    return f"block:{block_size}:{window_blocks}" if order == "block" else order


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


def _with_codec(field: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    """A schema field with its codec ("none", "lz4", "zstd"), level, and the
    stored vs raw payload bytes the writer counted (None when unknown: a
    version 1 database, or one appended to from such)."""
    entry = (meta.get("compression") or {}).get(field["name"])
    entry = entry if isinstance(entry, dict) else {}
    out = dict(field)
    out["codec"] = entry.get("codec", "none") if isinstance(entry.get("codec", "none"), str) else "none"
    out["level"] = entry.get("level")
    for key in ("stored_bytes", "raw_bytes"):
        value = entry.get(key)
        out[key] = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    return out


def info(path: PathLike) -> Dict[str, Any]:
    """Describes one database: metadata, sample count, fields, sizes on disk.
    For a shard directory: also ``manifest`` and per-shard ``shards``
    (path, num_samples, file_size); ``metadata`` is the first shard's."""
    path = os.fspath(path)
    check_database_path(path)
    reader = _C.Reader([path])
    if len(reader.paths) != 1 or os.path.isfile(os.path.join(path, "manifest.json")):
        return _shard_dir_info(path, reader)
    for message in reader.take_warnings():
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    meta = json.loads(reader.metadata_json(0))
    data_file = os.path.join(path, "data.mdb")
    return {
        "path": path,
        "num_samples": len(reader),
        "complete": bool(meta.get("complete", False)),
        "format_version": meta.get("format_version"),
        "samples_per_value": meta.get("samples_per_value", 1),
        "fields": [_with_codec(f, meta) for f in reader.schema()],
        "file_size": os.path.getsize(data_file),
        "map_size": reader.map_size(0),
        "metadata": meta,
        "selections": _C.list_selections(path),
    }


def _shard_dir_info(path: str, reader) -> Dict[str, Any]:
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    shards = [{"path": p, "num_samples": n, "file_size": os.path.getsize(os.path.join(p, "data.mdb"))}
              for p, n in zip(reader.paths, reader.file_sizes())]
    metas = [json.loads(reader.metadata_json(i)) for i in range(len(reader.paths))]
    return {
        "path": path,
        "num_samples": len(reader),
        "complete": all(bool(m.get("complete", False)) for m in metas),
        "format_version": metas[0].get("format_version"),
        "samples_per_value": metas[0].get("samples_per_value", 1),
        "fields": reader.schema(),
        "file_size": sum(s["file_size"] for s in shards),
        "map_size": sum(reader.map_size(i) for i in range(len(shards))),
        "metadata": metas[0],
        "manifest": manifest,
        "shards": shards,
        "selections": _C.list_selections(path),
    }

"""Mixture: several datasets read as one weighted stream.

The rule that says which source and which sample of it every global position
reads lives in the core (csrc/torch_lmdb/mixture.h, ``_C.MixtureOrder``);
this module opens the sources, reads each batch's samples from them and
assembles the batch. README "Mixing and selecting" states the semantics.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from torch_lmdb import _C, _plan
from torch_lmdb._renamed import renamed_keywords, spelled
from torch_lmdb import selection as _selection
from torch_lmdb.dataset import LMDBDataset
from torch_lmdb.stream import BatchIterator, _check_state, _draw_seed, _make_state, _rank_and_world

__all__ = ["Mixture", "MixtureBatchIterator"]

SOURCE_FIELD = "source"
_ORDERS_KEPT = 4  # MixtureOrders cached per process (an epoch's, and a few more)


def _open(name: str, source: Any) -> LMDBDataset:
    if isinstance(source, LMDBDataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return LMDBDataset(source)
    raise TypeError(f"mixture source '{name}' must be an LMDBDataset (or a selection of one) or a path, got "
                    f"{type(source).__name__}")


def _field_types(ds: LMDBDataset) -> Dict[str, tuple]:
    return {f["name"]: (f["kind"], f["dtype"]) for f in ds.schema}


class Mixture:
    """Several datasets read as one stream, in proportions.

    Args:
        sources: ``{name: dataset}``; a dataset is an :class:`LMDBDataset`, a
            selection of one (``ds.select``, ``ds.filter``, ``selection=``),
            or a path (a database or a shard directory).
        weights: proportions of an epoch, ``{name: w}`` or a sequence in the
            sources' order (normalised); None: proportional to the sizes.
        epoch_size: global positions per epoch (default: the sources' total).
        stratified: every block of ``block_size`` consecutive positions holds
            floor or ceil of ``w * block_size`` samples of each source (make
            the block the global batch, ``batch_size * world_size``); else
            each position draws its source at random with the weights.
        fields: the fields to read (they must exist in every source); None:
            every field, and the sources must have the same fields.
        block_size: see ``stratified``.
        pad, pad_value: pad variable-shape fields (as ``LMDBDataset``); the
            sources' options (verify, page_requests, ...) are the first source's.

    Every batch has the sources' fields and ``source`` (int64: the index of
    the sample's source in ``names``). Works with :func:`make_loader`
    (workers, ranks, ``set_epoch``, ``state_dict``), :meth:`iter_batches`
    and :meth:`get_batch`; block shuffle does not apply (each source is read
    in its own permutation).
    """

    def __init__(self, sources: Mapping[str, Any], weights: Union[None, Mapping[str, float], Sequence[float]] = None,
                 *, epoch_size: Optional[int] = None, stratified: bool = False,
                 fields: Optional[Sequence[str]] = None, block_size: int = 256,
                 pad: Union[bool, Sequence[str]] = False, pad_value: float = 0):
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError("Mixture needs a non-empty mapping {name: dataset}")
        self.names = [str(n) for n in sources]
        opened = [_open(n, sources[n]) for n in self.names]
        fields = self._common_fields(opened, fields)
        self._datasets = [_selection.with_fields(ds, fields) for ds in opened]
        # Every source's files as one dataset: source k's sample j is sample
        # offsets[k] + (its selection's j-th index, or j) of it.
        # Sources whose files share a schema (LMDB files of one dataset must)
        # are read as one group: one get_batch reads their samples straight
        # into the batch; several groups' batches are assembled (_assemble).
        options = dict(self._datasets[0]._options)
        options["decode_threads"] = options["decode_threads"] or None
        self._group, self._offsets, groups = [], [], {}
        for ds in self._datasets:
            key = repr(_C.Reader(ds.paths, **ds._options).schema())
            members = groups.setdefault(key, [])
            self._group.append(list(groups).index(key))
            self._offsets.append(sum(len(m._reader()) for m in members))
            members.append(ds)
        self._groups = [LMDBDataset([p for ds in members for p in ds.paths], fields=fields, pad=pad,
                                    pad_value=pad_value, **options) for members in groups.values()]
        self._pad = pad
        self._pad_value = float(pad_value)
        self._selections = [None if ds._selection is None else _selection.as_tensor(ds._selection).clone()
                            for ds in self._datasets]
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.names))
            if unknown or len(weights) != len(self.names):
                raise ValueError(f"weights name {sorted(weights)}, the sources are {self.names}")
            weights = [float(weights[n]) for n in self.names]
        self._weights = [] if weights is None else [float(w) for w in weights]
        self._sizes = [len(ds) for ds in self._datasets]
        if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, int)
                                       or epoch_size < 1):
            raise ValueError(f"epoch_size must be a positive int, got {epoch_size!r}")
        self._epoch_size = epoch_size or 0
        self.stratified = bool(stratified)
        self.block_size = block_size
        self._orders: Dict[tuple, Any] = {}
        self.weights = self._order(0, 0, True).weights()  # validates (ValueError names the source)

    @staticmethod
    def _common_fields(datasets: List[LMDBDataset], fields: Optional[Sequence[str]]) -> List[str]:
        if fields is not None:
            return [fields] if isinstance(fields, str) else list(fields)
        types = [_field_types(ds) for ds in datasets]
        for ds, t in zip(datasets[1:], types[1:]):
            if t != types[0]:
                differ = sorted(set(t.items()) ^ set(types[0].items()))
                raise ValueError(f"the sources' fields differ ({datasets[0].paths[0]}: vs {ds.paths[0]}: "
                                 f"{differ}); pass fields=[...] to read common ones")
        return list(types[0])

    # -- the rule (core) --------------------------------------------------------
    def _order(self, seed: int, epoch: int, shuffle: bool):
        key = (seed, epoch, shuffle)
        order = self._orders.get(key)
        if order is None:
            order = _C.MixtureOrder(self.names, self._sizes, self._weights, self._epoch_size, self.stratified,
                                    self.block_size, shuffle, seed, epoch)
            if len(self._orders) >= _ORDERS_KEPT:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = order
        return order

    def locate(self, first: int, count: int, seed: int = 0, epoch: int = 0, shuffle: bool = True):
        """(source, sample) int64 tensors of global positions [first, first + count):
        the source's index in ``names`` and the position inside that source."""
        return self._order(seed, epoch, shuffle).locate(first, count)

    def cursors(self, position: int, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> List[int]:
        """Per source, how many positions before ``position`` read it."""
        return self._order(seed, epoch, shuffle).cursors(position)

    def __len__(self) -> int:
        return len(self._order(0, 0, True))

    @property
    def datasets(self) -> Dict[str, LMDBDataset]:
        return dict(zip(self.names, self._datasets))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_orders"] = {}
        return state

    # -- reading ----------------------------------------------------------------
    def read(self, positions: Sequence[int], seed: int = 0, epoch: int = 0, shuffle: bool = True,
             with_source: bool = True) -> Dict[str, Any]:
        """The batch of global ``positions`` of epoch ``epoch`` (collated; with ``source``
        unless ``with_source`` is False).

        One ``get_batch`` over every source's files at once: the samples are
        read (in C++, into shared memory inside DataLoader workers) straight
        into the batch, in position order."""
        positions = list(positions)
        source, sample = self._locate_all(positions, seed, epoch, shuffle)
        index = torch.empty_like(sample)
        for k, (offset, chosen) in enumerate(zip(self._offsets, self._selections)):
            at = source == k
            index[at] = (sample[at] if chosen is None else chosen[sample[at]]) + offset
        if len(self._groups) == 1:
            batch = self._groups[0].get_batch(index.tolist())
        else:
            group = torch.tensor(self._group)[source]
            parts = []
            for g, ds in enumerate(self._groups):
                at = (group == g).nonzero().squeeze(1)
                if len(at):
                    parts.append((self._sources_of(g), at, ds.get_batch(index[at].tolist())))
            batch = self._assemble(len(positions), parts)
        if with_source:
            batch[SOURCE_FIELD] = source
        return batch

    def _sources_of(self, group: int) -> str:
        return "/".join(n for n, g in zip(self.names, self._group) if g == group)

    def get_batch(self, positions: Sequence[int]) -> Dict[str, Any]:
        """The batch of ``positions`` of epoch 0, seed 0, shuffled sources."""
        return self.read(positions)

    def __getitem__(self, request):
        if isinstance(request, tuple) and len(request) == 4:  # from make_loader's sampler
            positions, seed, epoch, shuffle = request
            # The source is added by _loader_finish in the loader's process: a small
            # tensor of its own would cross from a worker as a shared-memory segment
            # and a file descriptor per batch, costing more than the batch's read.
            return self.read(positions, seed, epoch, shuffle, with_source=False)
        if isinstance(request, int):
            batch = self.read([request])
            return {k: v[0] for k, v in batch.items()}
        return self.read(request)

    def _loader_request(self, positions: List[int], seed: int, epoch: int, order: str):
        """What make_loader's sampler hands a worker for a batch (loader.py)."""
        if order == "block":
            raise ValueError("block shuffle does not apply to a Mixture (each source is read in its own "
                             "permutation): call make_loader without block_size")
        return (positions, seed, epoch, order == "shuffle")

    def _loader_finish(self, batch: Dict[str, Any], request) -> Dict[str, Any]:
        """Adds the sources of a make_loader batch, in the loader's process (loader.py)."""
        positions, seed, epoch, shuffle = request
        batch[SOURCE_FIELD] = self._locate_all(positions, seed, epoch, shuffle)[0]
        return batch

    def _locate_all(self, positions: List[int], seed: int, epoch: int, shuffle: bool):
        """locate() of any list of positions (one call when they are a run)."""
        if positions and positions == list(range(positions[0], positions[0] + len(positions))):
            return self.locate(positions[0], len(positions), seed, epoch, shuffle)
        located = [self.locate(p, 1, seed, epoch, shuffle) for p in positions]
        if not located:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.cat([s for s, _ in located]), torch.cat([x for _, x in located])

    def _assemble(self, size: int, parts) -> Dict[str, Any]:
        if len(parts) <= 1:  # one source: its batch is already in position order
            return dict(parts[0][2]) if parts else {}
        out: Dict[str, Any] = {}
        for name, first in parts[0][2].items():
            if not isinstance(first, torch.Tensor):
                values: List[Any] = [None] * size
                for _, at, b in parts:
                    for j, p in enumerate(at.tolist()):
                        values[p] = b[name][j]
                out[name] = values
                continue
            shapes = [tuple(b[name].shape[1:]) for _, _, b in parts]
            if len(set(shapes)) > 1 and (len({len(s) for s in shapes}) > 1 or not name.endswith("_lengths")
                                         and not self._pads(name)):
                k, other = next((k, s) for (k, _, _), s in zip(parts, shapes) if s != shapes[0])
                raise ValueError(f"field '{name}' has shape {list(shapes[0])} in source '{parts[0][0]}' "
                                 f"and {list(other)} in source '{k}': pass pad=True (or pad=['{name}'])")
            shape = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
            if len(set(shapes)) > 1:
                t = torch.full([size] + shape, self._pad_value, dtype=first.dtype)
            else:
                t = torch.empty([size] + shape, dtype=first.dtype)
            for (_, at, b), s in zip(parts, shapes):
                t[(at,) + tuple(slice(0, n) for n in s)] = b[name]
            out[name] = t
        return out

    def _pads(self, name: str) -> bool:
        return self._pad is True or (not isinstance(self._pad, bool) and name in
                                     ([self._pad] if isinstance(self._pad, str) else list(self._pad)))

    @renamed_keywords(prefetch="batches_ahead")
    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: Optional[int] = None,
                     drop_last: bool = False, batches_ahead: int = 2, threads: int = 1, *, epoch: int = 0,
                     rank: Optional[int] = None, world_size: Optional[int] = None,
                     start: int = 0) -> "MixtureBatchIterator":
        """The batches of one epoch of this rank, read ahead by ``threads``
        threads (``LMDBDataset.iter_batches``' arguments and state dicts).
        Sources that share a schema are read by the C++ BatchStream
        (StreamOptions::mixture); otherwise by a Python thread pool."""
        for name, value in (("batch_size", batch_size), (spelled("batches_ahead"), batches_ahead),
                            ("threads", threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rank, world_size = _rank_and_world(rank, world_size)
        seed = _draw_seed(seed, None, world_size)
        if len(self._groups) == 1:  # the C++ BatchStream reads the mixture (StreamOptions::mixture)
            group = self._groups[0]
            pad_all, pad_fields = group._pad_args(self._pad)
            options = dict(batch_size=batch_size, order="shuffle" if shuffle else "sequential", seed=seed,
                           drop_last=drop_last, batches_ahead=batches_ahead, threads=threads, block_size=1024,
                           window_blocks=4,
                           pad=pad_all, pad_fields=pad_fields, pad_value=self._pad_value, epoch=epoch, rank=rank,
                           world_size=world_size, mixture=self._c_source())
            return BatchIterator(group._reader(), options, start)
        options = dict(batch_size=batch_size, shuffle=bool(shuffle), seed=seed, drop_last=drop_last,
                       batches_ahead=batches_ahead, threads=threads, epoch=epoch, rank=rank, world_size=world_size)
        return MixtureBatchIterator(self, options, start)

    def _c_source(self):
        """The mixture as the core's MixtureSource over the one group's reader."""
        return _C.MixtureSource(self.names, self._sizes, self._weights, self._epoch_size, self.stratified,
                                self.block_size, self._offsets,
                                [_selection.c_selection(ds) for ds in self._datasets])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {s} samples, w={w:.3g}" for n, s, w in zip(self.names, self._sizes, self.weights))
        return f"Mixture({{{parts}}}, epoch of {len(self)}{', stratified' if self.stratified else ''})"


class MixtureBatchIterator:
    """One epoch of a :class:`Mixture`'s batches for one rank, read ahead by a
    thread pool; ``state_dict``/``load_state_dict`` as :class:`BatchIterator`'s."""

    def __init__(self, mixture: Mixture, options: Dict[str, Any], start: int = 0):
        self._mixture = mixture
        self._options = dict(options)
        self._order_name = "shuffle" if options["shuffle"] else "sequential"
        self._pool: Optional[ThreadPoolExecutor] = None
        self._start(start)

    def _start(self, start: int) -> None:
        o = self._options
        self._close()
        self._plan = tuple(_plan.RankPlan(len(self._mixture), o["batch_size"], o["rank"], o["world_size"], start,
                                          o["drop_last"]))
        self._begin = start
        self._next = 0  # batches returned
        self._queued = 0  # batches submitted
        self._pool = ThreadPoolExecutor(o["threads"], thread_name_prefix="torch_lmdb-mixture")
        self._futures: deque = deque()
        self._fill()

    def batch_positions(self, k: int) -> List[int]:
        """Global positions of batch ``k`` of this epoch (from its start)."""
        first, count, _, pad_index = self._plan
        return [pad_index] if count[k] == 0 else list(range(first[k], first[k] + count[k]))

    def _fill(self) -> None:
        o = self._options
        while self._queued < len(self._plan[0]) and len(self._futures) < o["batches_ahead"]:
            self._futures.append(self._pool.submit(self._mixture.read, self.batch_positions(self._queued), o["seed"],
                                                   o["epoch"], o["shuffle"]))
            self._queued += 1

    def _close(self) -> None:
        if self._pool is not None:
            for f in getattr(self, "_futures", ()):
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        if not self._futures:
            self._close()
            raise StopIteration
        batch = self._futures.popleft().result()
        self._next += 1
        self._fill()
        return batch

    def __len__(self) -> int:
        return len(self._plan[0])

    def __del__(self):
        self._close()

    @property
    def position(self) -> int:
        return self._begin if self._next == 0 else self._plan[2][self._next - 1]

    def state_dict(self) -> Dict[str, Any]:
        o = self._options
        return _make_state(o["seed"], o["epoch"], self.position, len(self._mixture), self._order_name,
                           o["batch_size"], o["world_size"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_state(state, len(self._mixture), self._order_name, "Mixture.iter_batches")
        self._options["seed"] = int(state["seed"])
        self._options["epoch"] = int(state["epoch"])
        self._start(int(state["position"]))

"""Selections: views of a dataset restricted to some of its samples.

A selection is a list of sample indices (``array('q')``); position p of the
view reads sample ``indices[p]``. Every loader works in the selection's
positions (``len``, shuffling, block shuffle, ranks, resume) and maps to
sample indices when it reads, so a selected view reads only its samples'
pages and nothing is copied. Named selections are stored beside the data
(``<path>/selections/<name>.sel``, csrc/torch_lmdb/selection.h) and checked
against the data they were built for when opened.
"""
import copy
import os
from array import array
from typing import Any, Callable, Optional, Sequence

import torch

from torch_lmdb import _C

__all__ = ["as_tensor", "c_selection", "select", "filter_dataset", "with_fields", "load_named", "save_named", "stored_selections"]


def _as_indices(indices: Any) -> torch.Tensor:
    """A 1-dim int64 tensor of ``indices`` (list, range, numpy array, tensor, bool mask)."""
    t = torch.as_tensor(indices if not isinstance(indices, range) else list(indices))
    if t.dim() != 1:
        raise TypeError(f"a selection takes a 1-dim sequence of indices, got shape {list(t.shape)}")
    if t.dtype == torch.bool:
        t = t.nonzero().squeeze(1)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"selection indices must be integers, got {t.dtype}")
    return t.to(torch.int64)


def as_tensor(sel: array) -> torch.Tensor:
    """The int64 tensor over a selection's indices (shares its memory)."""
    return torch.frombuffer(sel, dtype=torch.int64) if len(sel) else torch.zeros(0, dtype=torch.int64)


def _view(ds, sample_indices: torch.Tensor):
    """A copy of ``ds`` reading only ``sample_indices`` (already checked)."""
    out = copy.copy(ds)
    out._selection = array("q", sample_indices.tolist())
    out._c_selection = None
    out._len = len(out._selection)
    return out


def select(ds, indices: Any, allow_duplicates: bool = False):
    """The view of ``ds`` at ``indices`` (positions of ``ds``: a view of a view
    composes). IndexError names the first index out of range, ValueError a
    duplicate (unless ``allow_duplicates``)."""
    positions = _as_indices(indices)
    n = len(ds)
    bad = ((positions < -n) | (positions >= n)).nonzero()
    if len(bad):
        p = int(bad[0])
        raise IndexError(f"selection position {p}: index {int(positions[p])} out of range for dataset of size {n} "
                         f"at '{ds._paths[0]}'")
    positions = torch.where(positions < 0, positions + n, positions)
    if not allow_duplicates and len(positions) != len(torch.unique(positions)):
        values, counts = torch.unique(positions, return_counts=True)
        raise ValueError(f"index {int(values[counts > 1][0])} appears twice in the selection "
                         f"(pass allow_duplicates=True to allow it)")
    current = ds._selection
    samples = positions if current is None else as_tensor(current)[positions]
    return _view(ds, samples)


def c_selection(ds):
    """This process's ``_C.Selection`` of ``ds`` (None without a selection)."""
    if ds._selection is None:
        return None
    if ds._c_selection is None or ds._c_selection[0] != os.getpid():
        ds._c_selection = (os.getpid(), _C.Selection(as_tensor(ds._selection), len(ds._reader()), allow_duplicates=True))
    return ds._c_selection[1]


def with_fields(ds, fields: Sequence[str]):
    """A copy of ``ds`` (its selection kept) reading only ``fields``."""
    out = copy.copy(ds)
    out._fields = [fields] if isinstance(fields, str) else list(fields)
    out._handle = None
    out._generation = None
    names = [f["name"] for f in _C.Reader(ds._paths, **ds._options).schema()]
    unknown = [f for f in out._fields if f not in names]
    if unknown:
        raise KeyError(f"unknown field(s) {unknown} in '{ds._paths[0]}'; available: {names}")
    out._schema = out._reader().schema()
    return out


def _data_path(ds) -> str:
    if len(ds._paths) != 1:
        raise ValueError(f"named selections are stored beside one database or shard directory; this dataset reads "
                         f"{len(ds._paths)} paths ({ds._paths})")
    return ds._paths[0]


def _file(ds, name: str) -> str:
    return _C.selection_path(_data_path(ds), name)


def save_named(ds, name: str, sample_indices: torch.Tensor) -> str:
    """Stores ``sample_indices`` as selection ``name`` of ``ds``'s data; returns the file."""
    reader = ds._reader()
    file = _file(ds, name)
    sel = _C.Selection(sample_indices.to(torch.int64), len(reader), allow_duplicates=True)
    _C.save_selection(file, sel, len(reader), _C.data_identity(reader))
    return file


def load_named(ds, name: str) -> array:
    """The sample indices of stored selection ``name`` (checked against the data)."""
    reader = ds._reader()
    sel = _C.load_selection(_file(ds, name), len(reader), _C.data_identity(reader))
    return array("q", sel.indices().tolist())


def stored_selections(path: str):
    """Names of the selections stored beside ``path``."""
    return _C.list_selections(os.fspath(path))


def filter_dataset(ds, predicate: Callable[[dict], Any], fields: Sequence[str], name: Optional[str] = None,
                   batch_size: int = 65536, threads: int = 2):
    """The view of ``ds`` whose samples ``predicate`` accepts.

    ``predicate`` gets batches (dicts) of only ``fields`` (read in C++ in
    batches of ``batch_size``, in order) and returns a boolean mask of the
    batch's length. With ``name`` the result is also stored beside the data.
    """
    if isinstance(fields, str):
        fields = [fields]
    if not fields:
        raise ValueError("filter needs the fields its predicate reads (fields=[...])")
    sub = with_fields(ds, fields)
    keep = []
    first = 0
    for batch in sub.iter_batches(batch_size, shuffle=False, threads=threads, rank=0, world_size=1):
        count = len(batch[fields[0]]) if fields[0] in batch else len(next(iter(batch.values())))
        mask = torch.as_tensor(predicate(batch))
        if mask.dtype != torch.bool or mask.shape != (count,):
            raise TypeError(f"the filter predicate must return a bool mask of shape ({count},), got "
                            f"{mask.dtype} of shape {tuple(mask.shape)} for positions [{first}, {first + count})")
        keep.append(mask.nonzero().squeeze(1) + first)
        first += count
    positions = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
    view = select(ds, positions)
    if name is not None:
        save_named(ds, name, as_tensor(view._selection))
    return view

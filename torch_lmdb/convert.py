"""Conversion of Zarr stores, HDF5 files and pickle-in-LMDB databases to torch_lmdb.

A *source* exposes ``num_samples``, ``fields`` (name -> description), ``block``
(a chunk-aligned read size), ``read(start, stop, fields)`` returning one list
of per-sample values per field, and ``provenance`` (attributes and origin)
stored as the ``user`` metadata of the output. :func:`convert` writes one or
several shards (in parallel processes), resumes an interrupted run and
verifies the result against the source.
"""
import base64
import datetime
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["open_source", "convert", "convert_splits", "find_splits", "split_file_name", "ConversionError",
           "ConversionWarning", "Interrupted"]

# Small arrays whose first dimension is not the sample count are kept in the
# metadata (as lists); larger ones are refused unless --skip-mismatched.
MISMATCHED_METADATA_LIMIT = 1 << 20
BLOCK_BYTES = 32 << 20  # target bytes per read block


class ConversionError(RuntimeError):
    """A source that cannot be converted as asked (named file, field or index)."""


class ConversionWarning(UserWarning):
    """Something a conversion leaves out or changes (an array left out by --skip-mismatched)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM during a conversion."""


def _torch_unsigned_widening() -> Dict[str, Any]:
    import torch

    if hasattr(torch, "uint16"):  # torch >= 2.3 stores uint16/32/64 as they are
        return {}
    return {"uint16": np.int32, "uint32": np.int64}


_WIDEN = _torch_unsigned_widening()


def _to_sample_value(name: str, value: Any, element_shape: Optional[Sequence[int]] = None) -> Any:
    """One sample's value of a field, as LMDBWriter takes it."""
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:  # a big-endian source ('>f8'): the writer takes native byte order
            value = value.astype(value.dtype.newbyteorder("="))
        kind = value.dtype.kind  # (dtype.name is slow: this runs once per field and sample)
        if kind == "u" and _WIDEN and value.dtype.itemsize in (2, 4):
            value = value.astype(_WIDEN[value.dtype.name])  # torch < 2.3 has no uint16/uint32: widen
        elif kind == "U":
            return str(value) if value.ndim == 0 else value.tolist()
        elif kind == "S":
            return bytes(value) if value.ndim == 0 else value.tolist()
        if element_shape is not None:
            value = value.reshape(element_shape)
        return value
    if isinstance(value, np.generic):
        return _to_sample_value(name, np.asarray(value), element_shape)
    if isinstance(value, (str, bytes, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):  # ragged element decoded as a list
        return _to_sample_value(name, np.asarray(value), element_shape)
    raise ConversionError(f"field {name!r}: unsupported value type {type(value).__name__}")


def _variable(dtype: np.dtype) -> bool:
    """Object arrays (ragged, variable-length str/bytes) and numpy 2's StringDType (zarr 3)."""
    return dtype.kind in "OT"


def _describe_dtype(dtype: np.dtype) -> str:
    return "ragged" if _variable(dtype) else str(dtype)


def _sample_count(arrays: Dict[str, Any]) -> Optional[int]:
    """The first dimension most arrays share (ties: the larger); None if no array has one."""
    lengths = Counter(a.shape[0] for a in arrays.values() if len(a.shape) >= 1)
    if not lengths:
        return None
    return max(lengths.items(), key=lambda kv: (kv[1], kv[0]))[0]


# Group names that make a store a split store even when its groups have equal sample counts.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval",
                         "evaluation", "holdout"})


def find_splits(arrays: Dict[str, Any]) -> List[str]:
    """The split groups of a store, given its arrays by path (``group/.../name``); [] for a
    store that is one dataset.

    Splits are the top-level groups that hold the same set of array paths (relative to
    the group), at least two of them, provided no array outside them has a first
    dimension equal to a split's sample count (the root then holds per-sample arrays:
    one dataset whose groups are fields), and the splits either differ in sample count or
    are all named like splits (``train``, ``val``, ``test``, ...; see ``SPLIT_NAMES``).
    Groups holding another set of arrays (e.g. ``meta/``) are not splits.
    """
    groups: Dict[str, Dict[str, Any]] = {}
    for name, array in arrays.items():
        if "/" in name:
            top, rel = name.split("/", 1)
            groups.setdefault(top, {})[rel] = array
    by_names: Dict[frozenset, List[str]] = {}
    for top, members in groups.items():
        by_names.setdefault(frozenset(members), []).append(top)
    if not by_names:
        return []
    names, tops = max(by_names.items(), key=lambda kv: (len(kv[1]), len(kv[0])))
    if len(tops) < 2:
        return []
    counts = {top: _sample_count(groups[top]) for top in tops}
    if any(c is None for c in counts.values()):
        return []
    outside = [a for name, a in arrays.items() if name.split("/", 1)[0] not in counts or "/" not in name]
    if any(len(a.shape) >= 1 and a.shape[0] in counts.values() for a in outside):
        return []
    if len(set(counts.values())) == 1 and not all(t.lower() in SPLIT_NAMES for t in tops):
        return []
    return sorted(tops)


def _group_paths(arrays: Dict[str, Any]) -> List[str]:
    """Every group path that holds arrays (at any depth)."""
    out = set()
    for name in arrays:
        parts = name.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            out.add("/".join(parts[:k]))
    return sorted(out)


def split_file_name(group: str) -> str:
    """The database name of a split: ``train`` -> ``train.lmdb``; the ``/`` of a nested
    group becomes ``__`` (``2024/train`` -> ``2024__train.lmdb``) and characters other than
    letters, digits, ``.``, ``-``, ``_`` become ``_``."""
    name = "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in group.strip("/").split("/"))
    if name.strip(".") == "":
        name = "_" + name
    return name + ".lmdb"


class _ArraySource:
    """Shared logic of Zarr and HDF5: named arrays under a root group.

    ``group``: convert one split group (a path such as ``train``); its arrays are named
    relative to it, the root's attributes become ``source_attrs`` and the group's
    ``group_attrs``; arrays outside every split are handled like mismatched arrays. A
    ``path`` naming a group inside a store (``store.zarr/train``, see ``within``) carries
    its attributes the same way.
    """

    format = ""
    # (group path, the store root's attributes) when ``path`` is a group inside a store.
    within: Optional[Tuple[str, Dict[str, Any]]] = None

    def __init__(self, path: str, skip_mismatched: bool, allow_pickle: bool = False,
                 group: Optional[str] = None, allow_external: bool = False):
        self.path = path
        self.skip_mismatched = skip_mismatched
        self.allow_pickle = allow_pickle
        self.allow_external = allow_external
        arrays, attrs = self._walk()
        if not arrays:
            raise ConversionError(f"'{path}' holds no arrays")
        self.splits = find_splits(arrays)
        self.groups = _group_paths(arrays)
        self.source_attrs = attrs.get("/", {})
        self.group = None
        self.group_attrs: Dict[str, Any] = {}
        outside: Dict[str, Any] = {}
        if group is not None:
            group = group.strip("/")
            prefix = group + "/"
            inner = {n[len(prefix):]: a for n, a in arrays.items() if n.startswith(prefix)}
            if not inner:
                available = self.splits or self.groups
                raise ConversionError(f"'{path}' has no group '{group}' holding arrays; available: "
                                      f"{', '.join(available) if available else 'none (the store has no groups)'}")
            owned = set(self.splits) | {group}
            outside = {n: a for n, a in arrays.items()
                       if not any(n.startswith(g + "/") or g.startswith(n + "/") for g in owned)}
            self.group = group
            # Zarr keys a group's attributes "group/", HDF5 "group".
            self.group_attrs = attrs.get(group, attrs.get(prefix, {}))
            attrs = {("/" if k in (group, prefix) else k[len(prefix):]): v for k, v in attrs.items()
                     if k == group or k.startswith(prefix)}
            arrays = inner
        elif self.splits:
            raise ConversionError(f"'{path}' holds splits ({', '.join(self.splits)}): convert them one database "
                                  f"each (--output-dir DIR, or --group NAME)")
        if self.within is not None:
            if self.group is None:
                self.group_attrs = self.source_attrs
            self.source_attrs = self.within[1]
        # The sample count: the first dimension most arrays share (ties: the larger).
        self.num_samples = _sample_count(arrays)
        if self.num_samples is None:
            raise ConversionError(f"'{path}': no array has a sample dimension (all are 0-dimensional)")
        self._arrays = {}
        self.mismatched: Dict[str, Any] = {}
        skipped: List[str] = []
        where = f"'{path}'" + (f" (group '{group}')" if group else "")
        candidates = list(arrays.items()) + [(n if n not in arrays else "/" + n, a) for n, a in outside.items()]
        for name, array in candidates:
            if name in arrays and len(array.shape) >= 1 and array.shape[0] == self.num_samples:
                self._arrays[name] = array
                continue
            variable = _variable(array.dtype)
            nbytes = int(np.prod(array.shape)) * (64 if variable else array.dtype.itemsize)
            if skip_mismatched:
                skipped.append(name)
                warnings.warn(f"{where}: left out array '{name}' of shape {list(array.shape)} "
                              f"({_describe_dtype(array.dtype)}): its first dimension is not the "
                              f"{self.num_samples} samples (--skip-mismatched)", ConversionWarning, stacklevel=2)
            elif nbytes <= MISMATCHED_METADATA_LIMIT and not variable:
                value = np.asarray(array[...])
                self.mismatched[name] = {"dtype": str(value.dtype), "shape": list(value.shape),
                                         "value": _plain(value) if value.dtype.kind not in "SV" else None}
            else:
                raise ConversionError(
                    f"{where}: array '{name}' has shape {list(array.shape)}, not {self.num_samples} samples "
                    f"along its first dimension, and is too large to keep in the metadata; "
                    f"pass --skip-mismatched to leave it out")
        self.skipped = skipped
        self.attrs = attrs
        self.fields = {}
        for name, array in self._arrays.items():
            ragged = _variable(array.dtype)
            self.fields[name] = {"dtype": _describe_dtype(array.dtype),
                                 "shape": [-1] if ragged else list(array.shape[1:])}
        chunk_rows = [self._chunk_rows(a) for a in self._arrays.values()]
        row_bytes = sum(self._row_bytes(a) for a in self._arrays.values()) or 1
        base = max(chunk_rows) if chunk_rows else 1024
        # A multiple of the largest chunk, about BLOCK_BYTES per block.
        self.block = max(base, base * max(1, BLOCK_BYTES // (row_bytes * base)))

    @staticmethod
    def _chunk_rows(array) -> int:
        shards = getattr(array, "shards", None)  # zarr 3: read whole shards, not their inner chunks
        if shards:
            return int(shards[0])
        return int(array.chunks[0]) if array.chunks else 1024

    def _row_bytes(self, array) -> int:
        if _variable(array.dtype):
            return 256
        return int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize

    def element_shape(self, name: str) -> Optional[List[int]]:
        shape = self.attrs.get(name, {}).get("element_shape")
        return list(shape) if shape is not None else None

    def read(self, start: int, stop: int, fields: Sequence[str]) -> Dict[str, List[Any]]:
        out = {}
        for name in fields:
            block = self._arrays[name][start:stop]
            shape = self.element_shape(name) if _variable(self._arrays[name].dtype) else None
            out[name] = [_to_sample_value(name, block[i], shape) for i in range(len(block))]
        return out

    @property
    def provenance(self) -> Dict[str, Any]:
        prov: Dict[str, Any] = {"attrs": self.attrs, "source_attrs": self.source_attrs}
        group = "/".join(g for g in ((self.within or ("",))[0], self.group or "") if g)
        if group:
            prov["group"] = group
            prov["group_attrs"] = self.group_attrs
        if self.mismatched:
            prov["mismatched_arrays"] = self.mismatched
        if self.skipped:
            prov["skipped_arrays"] = self.skipped
        return prov


def _plain(value: Any) -> Any:
    """Attribute values as JSON values (README, Provenance): NaN and infinities become the
    strings "NaN", "Infinity", "-Infinity"; bytes a str when they are UTF-8, else
    ``{"base64": "..."}``."""
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ZarrSource(_ArraySource):
    """Zarr stores of format 2 and 3, through zarr-python 2.x or 3.x (see torch_lmdb._zarr).

    Every metadata file is checked as zarr reads it (see _zarr.open_store): corrupt JSON,
    a FIFO or an oversized file names the file, and an array with the Pickle codec is
    refused before any chunk is read unless ``allow_pickle``. A group with the attribute ``"ragged": true`` (``values`` +
    ``offsets``) is one ragged field.
    """

    format = "zarr"

    def _walk(self):
        import warnings

        import zarr

        from torch_lmdb import _zarr

        # zarr 3 warns on every open that vlen-utf8 / vlen-bytes are "not part of the v3 spec" yet.
        warnings.filterwarnings("ignore", message=r".*not part in the Zarr format 3 specification", category=UserWarning)
        try:
            return self._visit_store(zarr, _zarr)
        except _zarr.StoreError as e:
            raise ConversionError(str(e)) from None

    def _visit_store(self, zarr, _zarr):
        try:
            root = _zarr.open_store(self.path, self.allow_pickle)
        except _zarr.StoreError:
            raise
        except Exception as e:  # zarr raises several types for a missing/invalid store
            raise ConversionError(f"cannot open Zarr store '{self.path}': {type(e).__name__}: {e}") from None
        arrays, attrs = {}, {}
        self.within = None if isinstance(root, zarr.Array) else self._enclosing_store(_zarr)
        if isinstance(root, zarr.Array):
            name = os.path.splitext(os.path.basename(self.path.rstrip("/")))[0]
            arrays[name] = _zarr.readable(_zarr.checked(self.path, name, root, self.allow_pickle))
            return arrays, attrs

        def visit(group, prefix):
            group_attrs = dict(group.attrs.asdict())
            if group_attrs:
                attrs[prefix or "/"] = _plain(group_attrs)
            for name, array in sorted(group.arrays(), key=lambda kv: kv[0]):
                path = f"{prefix}{name}"
                arrays[path] = _zarr.readable(_zarr.checked(self.path, path, array, self.allow_pickle))
                if array.attrs.asdict():
                    attrs[path] = _plain(dict(array.attrs.asdict()))
            for name, sub in sorted(group.groups(), key=lambda kv: kv[0]):
                sub_attrs = dict(sub.attrs.asdict())
                if sub_attrs.get("ragged") is True:
                    path = f"{prefix}{name}"
                    for part in ("values", "offsets"):
                        if part in sub:
                            _zarr.checked(self.path, f"{path}/{part}", sub[part], self.allow_pickle)
                    try:
                        arrays[path] = _zarr.RaggedArray(sub, path)
                    except _zarr.StoreError as e:
                        raise ConversionError(f"'{self.path}': {e}") from None
                    attrs[path] = _plain(sub_attrs)
                else:
                    visit(sub, f"{prefix}{name}/")

        visit(root, "")
        return arrays, attrs


    def _enclosing_store(self, _zarr) -> Optional[Tuple[str, Dict[str, Any]]]:
        """``within`` for a local group path whose parent directories are Zarr groups."""
        here = os.path.abspath(self.path)
        root, parent = None, os.path.dirname(here)
        while parent != os.path.dirname(parent) and any(os.path.isfile(os.path.join(parent, name))
                                                        for name in (".zgroup", "zarr.json")):
            root, parent = parent, os.path.dirname(parent)
        if root is None:
            return None
        attrs = _zarr.open_store(root, self.allow_pickle).attrs.asdict()
        return os.path.relpath(here, root).replace(os.sep, "/"), _plain(dict(attrs))


class HDF5Source(_ArraySource):
    format = "hdf5"

    def _walk(self):
        import h5py

        try:
            self._file = h5py.File(self.path, "r")
        except Exception as e:
            raise ConversionError(f"cannot open HDF5 file '{self.path}': {e}") from None
        arrays, attrs = {}, {}

        def visit(name, obj):
            if obj.attrs:
                attrs[name] = _plain({k: obj.attrs[k] for k in obj.attrs})
            if isinstance(obj, h5py.Dataset):
                self._refuse_external(name, self._outside_files(obj))
                arrays[name] = _HDF5Array(obj)

        if self._file.attrs:
            attrs["/"] = _plain({k: self._file.attrs[k] for k in self._file.attrs})
        self._file.visititems(visit)
        for name, target in self._external_links():  # visititems does not follow them
            self._refuse_external(name, [target])
            obj = self._file[name]
            visit(name, obj)
            if isinstance(obj, h5py.Group):
                obj.visititems(lambda inner, o: visit(f"{name}/{inner}", o))
        return arrays, attrs

    def _external_links(self) -> List[Tuple[str, str]]:
        """(link path, target file) of every external link in the file."""
        import h5py

        links: List[Tuple[str, str]] = []

        def add(name, info):
            if info.type == h5py.h5l.TYPE_EXTERNAL:
                name = name.decode("utf-8", "replace")
                links.append((name, self._file.get(name, getlink=True).filename))

        self._file.id.links.visit(add, info=True)
        return sorted(links)

    def _outside_files(self, dataset) -> List[str]:
        """The files other than the source that hold ``dataset``'s data: external storage
        (``external=``) and the sources of a virtual dataset."""
        files = [name for name, _, _ in dataset.external or []]
        if dataset.is_virtual:
            here = os.path.realpath(self.path)
            for source in dataset.virtual_sources():
                target = os.path.join(os.path.dirname(here), source.file_name)
                if source.file_name != "." and os.path.realpath(target) != here:
                    files.append(source.file_name)
        return files

    def _refuse_external(self, name: str, files: List[str]) -> None:
        if files and not self.allow_external:
            raise ConversionError(f"'{self.path}': '{name}' reads the file(s) {', '.join(map(repr, files))} outside "
                                  f"the source (external storage, external link or virtual dataset); pass "
                                  f"--allow-external (allow_external=True) only for a source you trust")

class _HDF5Array:
    """An h5py dataset with variable-length and string types as numpy objects."""

    def __init__(self, dataset):
        import h5py

        self._ds = dataset
        self.shape = dataset.shape
        self.chunks = dataset.chunks
        self._string = h5py.check_string_dtype(dataset.dtype)
        vlen = h5py.check_vlen_dtype(dataset.dtype)
        self.dtype = np.dtype(object) if (vlen is not None and self._string is None) else dataset.dtype
        if self._string is not None and self._string.length is None:
            self.dtype = np.dtype(object)

    def __getitem__(self, key):
        if self._string is not None and self._string.encoding == "utf-8":
            return self._ds.asstr()[key]
        return self._ds[key]


class PickleLMDBSource:
    """A py-lmdb database whose values are pickled dicts (the design torch_lmdb
    replaces). Unpickling executes code from the file: only for trusted data."""

    format = "pickle-lmdb"
    group = None

    def __init__(self, path: str, skip_mismatched: bool, allow_pickle: bool = False):
        import lmdb

        self.path = path
        if not allow_pickle:
            raise ConversionError(f"converting '{path}' unpickles its values, which runs code stored in the file; "
                                  f"pass --allow-pickle (allow_pickle=True) only for a database you trust")
        if not os.path.exists(path):
            raise ConversionError(f"no LMDB database at '{path}'")
        try:
            self._env = lmdb.open(path, readonly=True, lock=False, subdir=os.path.isdir(path), readahead=False)
        except lmdb.Error as e:
            raise ConversionError(f"cannot open LMDB database '{path}': {e}") from None
        keys, skipped = [], []
        with self._env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                if key.startswith(b"__") and key.endswith(b"__"):
                    skipped.append(key.decode("utf-8", "replace"))
                else:
                    keys.append(bytes(key))
        if keys and all(k.isdigit() for k in keys):
            keys.sort(key=int)  # "0", "1", ..., "10": numeric order, not byte order
            self.key_order = "numeric"
        else:
            self.key_order = "bytewise"
        self._keys = keys
        self.skipped = skipped
        self.num_samples = len(keys)
        self.block = 1024
        if not keys:
            raise ConversionError(f"'{path}' holds no samples")
        with self._env.begin() as txn:
            first = self._load(txn, 0)
        self.fields = {name: self._describe(v) for name, v in first.items()}

    @staticmethod
    def _describe(value: Any) -> Dict[str, Any]:
        if isinstance(value, np.ndarray):
            return {"dtype": str(value.dtype), "shape": list(value.shape)}
        return {"dtype": type(value).__name__, "shape": []}

    def _load(self, txn, i: int) -> Dict[str, Any]:
        import pickle

        try:
            value = pickle.loads(txn.get(self._keys[i]))
        except Exception as e:
            raise ConversionError(f"'{self.path}': key {self._keys[i]!r} (index {i}) does not unpickle: {e}") from None
        if not isinstance(value, dict):
            raise ConversionError(f"'{self.path}': key {self._keys[i]!r} (index {i}) holds a "
                                  f"{type(value).__name__}, expected a dict of field values")
        return value

    def read(self, start: int, stop: int, fields: Sequence[str]) -> Dict[str, List[Any]]:
        out: Dict[str, List[Any]] = {name: [] for name in fields}
        with self._env.begin() as txn:  # one read transaction per block
            for i in range(start, stop):
                sample = self._load(txn, i)
                for name in fields:
                    if name not in sample:
                        raise ConversionError(f"'{self.path}': key {self._keys[i]!r} (index {i}) has no field {name!r}")
                    out[name].append(_to_sample_value(name, sample[name]))
        return out

    @property
    def provenance(self) -> Dict[str, Any]:
        return {"attrs": {}, "skipped_keys": self.skipped, "key_order": self.key_order}


SOURCES = {"zarr": ZarrSource, "hdf5": HDF5Source, "pickle-lmdb": PickleLMDBSource}


# The source compressors (Zarr codec ids / Blosc cnames, HDF5 filters) and the
# nearest codec of torch_lmdb: the fast ones map to LZ4, the strong ones to Zstd.
_NEAREST_CODEC = {"lz4": "lz4", "lz4hc": "lz4", "blosclz": "lz4", "snappy": "lz4", "lzf": "lz4",
                  "zstd": "zstd", "zlib": "zstd", "gzip": "zstd", "bz2": "zstd", "lzma": "zstd", "szip": "zstd"}
# HDF5 registered filter ids: Blosc, LZ4, Zstd, bzip2 (h5py names gzip/lzf/szip itself).
_HDF5_FILTERS = {32001: "blosc", 32004: "lz4", 32015: "zstd", 307: "bz2"}
_BLOSC_CODES = ["blosclz", "lz4", "lz4hc", "snappy", "zlib", "zstd"]  # Blosc's compressor codes


def _codec_configs(array) -> List[Dict[str, Any]]:
    """The compressor configs of a Zarr array (format 2 or 3, zarr-python 2 or 3)."""
    codecs = []
    for attr in ("compressor", "compressors", "_values"):
        try:
            value = getattr(array, attr, None)
        except Exception:  # noqa: BLE001 -- zarr-python 3: `compressor` of a format 3 array raises
            value = None
        if attr == "_values" and value is not None:  # a ragged group: its values array
            return _codec_configs(value)
        if value is None:
            continue
        for codec in (value if isinstance(value, (list, tuple)) else [value]):
            config = None
            for method in ("get_config", "to_dict"):
                if callable(getattr(codec, method, None)):
                    try:
                        config = dict(getattr(codec, method)())
                    except Exception:  # noqa: BLE001 -- an unusual codec: described by its name below
                        config = None
                    break
            codecs.append(config if config is not None else {"id": type(codec).__name__.lower()})
    return codecs


def source_codec(array) -> str:
    """The torch_lmdb codec ("none", "lz4" or "zstd") nearest to the compressor
    of a source array: Blosc takes its inner compressor (lz4/blosclz/snappy ->
    lz4, zstd/zlib -> zstd), Zstd/LZ4 themselves, zlib/gzip/bz2/lzma/szip ->
    zstd, lzf -> lz4; "none" for an uncompressed array or an unknown compressor."""
    names: List[str] = []
    dataset = getattr(array, "_ds", None)  # _HDF5Array
    if dataset is not None:
        if dataset.compression:
            names.append(str(dataset.compression))
        for fid, options in (getattr(dataset, "_filters", None) or {}).items():
            try:
                name = _HDF5_FILTERS.get(int(fid))
            except (TypeError, ValueError):
                name = str(fid)
            if name == "blosc":  # cd_values[6] is Blosc's compressor code
                code = options[6] if isinstance(options, (list, tuple)) and len(options) > 6 else 0
                name = _BLOSC_CODES[code] if 0 <= int(code) < len(_BLOSC_CODES) else "lz4"
            if name:
                names.append(name)
    else:
        for config in _codec_configs(array):
            codec_id = str(config.get("id") or config.get("name") or "").lower().rsplit(".", 1)[-1]
            inner = config.get("cname") or (config.get("configuration") or {}).get("cname")
            names.append(str(getattr(inner, "value", inner)).lower() if codec_id == "blosc" and inner else codec_id)
    for name in names:
        if name in _NEAREST_CODEC:
            return _NEAREST_CODEC[name]
    return "none"


COMPRESSIONS = ("lz4", "zstd", "none", "source")


def source_compression(source, fields: Sequence[str], compression: str = "lz4") -> Dict[str, str]:
    """The codec of each of ``fields`` of an open source (``compression=`` of LMDBWriter):
    "lz4" (the default: README advises it for data read every epoch), "zstd" and "none"
    apply to every field; "source" (formerly "auto") follows each array's compressor (see
    source_codec; a pickle-in-LMDB source has none)."""
    if compression in ("source", "auto"):
        arrays = getattr(source, "_arrays", {})
        return {name: source_codec(arrays[name]) if name in arrays else "none" for name in fields}
    if compression not in COMPRESSIONS:
        raise ConversionError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    return {name: compression for name in fields}


def open_source(kind: str, path: str, skip_mismatched: bool = False, allow_pickle: bool = False,
                group: Optional[str] = None, allow_external: bool = False):
    """A source of ``kind`` ("zarr", "hdf5", "pickle-lmdb"). Nothing is unpickled unless
    ``allow_pickle``: a Zarr array with the Pickle codec is refused, and a pickle-in-LMDB
    database is refused as a whole. No file outside an HDF5 source is read unless
    ``allow_external`` (external storage, external links, virtual datasets). ``group``: one
    split group of a Zarr store or HDF5 file (see :func:`find_splits`); a store with splits
    needs one."""
    if kind == "pickle-lmdb":
        if group is not None:
            raise ConversionError(f"'{path}': a pickle-in-LMDB database has no groups (--group {group})")
        return SOURCES[kind](path, skip_mismatched, allow_pickle)
    return SOURCES[kind](path, skip_mismatched, allow_pickle, group=group, allow_external=allow_external)


def store_splits(kind: str, path: str, allow_pickle: bool = False,
                 allow_external: bool = False) -> Tuple[List[str], List[str]]:
    """``(splits, groups)`` of a source: the split groups :func:`find_splits` detects ([] for
    a store that is one dataset) and every group path that holds arrays."""
    if kind not in ("zarr", "hdf5"):
        return [], []
    source = SOURCES[kind].__new__(SOURCES[kind])
    source.path, source.allow_pickle, source.allow_external = path, allow_pickle, allow_external
    arrays, _ = source._walk()
    return find_splits(arrays), _group_paths(arrays)


def _chunk_coverage(array, n: int) -> Optional[Tuple[int, int]]:
    """(stored, needed): how many of the storage chunks (Zarr chunks or shards, HDF5 chunks)
    holding the first ``n`` samples of ``array`` exist; None when not chunked or unknown."""
    dataset = getattr(array, "_ds", None)  # _HDF5Array
    if dataset is not None:
        if dataset.chunks is None:
            return None
        grid = [math.ceil(s / c) for s, c in zip(dataset.shape, dataset.chunks)]
        rows, stored = dataset.chunks[0], dataset.id.get_num_chunks()
    elif hasattr(array, "nchunks_initialized"):
        from torch_lmdb import _zarr

        # zarr-python 3 counts 0 for arrays read through the checking view, and
        # by default stores no chunk equal to the fill value: its count is not
        # a measure of missing data (the free-space estimate below still holds).
        if _zarr.zarr_major() >= 3:
            return None
        grid = list(array.cdata_shape)
        rows, stored = (getattr(array, "shards", None) or array.chunks)[0], array.nchunks_initialized
    else:
        return None
    needed = math.ceil(n / rows) * math.prod(grid[1:])
    return min(stored, needed), needed


def _check_feasible(source, label: str, names: Sequence[str], n: int, output: str,
                    allow_missing_chunks: bool) -> None:
    """Refuses, before anything is written, a conversion that would mostly write fill
    values (more than half of the chunks its samples need are missing, unless
    ``allow_missing_chunks``) or whose output would not fit in the free space."""
    arrays = getattr(source, "_arrays", {})
    for name in names:
        coverage = _chunk_coverage(arrays[name], n) if name in arrays else None
        if coverage and 2 * coverage[0] < coverage[1] and not allow_missing_chunks:
            raise ConversionError(f"{label}: array '{name}' stores {coverage[0]:,} of the {coverage[1]:,} chunks its "
                                  f"{n:,} samples need (the rest would be written as fill values); pass "
                                  f"--allow-missing-chunks (allow_missing_chunks=True) if that is intended")
    estimate = n * sum(source._row_bytes(arrays[name]) for name in names if name in arrays)
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if estimate > free:
        raise ConversionError(f"{label}: {n:,} samples need about {_human_bytes(estimate)} before compression, more "
                              f"than the {_human_bytes(free)} free under '{parent}'; convert fewer (--limit N) "
                              f"or free space")


def shard_ranges(n: int, shards: int) -> List[Tuple[int, int]]:
    """``shards`` contiguous ranges of near-equal size covering [0, n)."""
    bounds = [n * k // shards for k in range(shards + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(shards)]


def output_paths(output: str, shards: int) -> List[str]:
    if shards == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{k:05d}-of-{shards:05d}{ext or '.lmdb'}" for k in range(shards)]


def _blocks(source, start: int, stop: int):
    """Chunk-aligned [begin, end) ranges covering [start, stop)."""
    position = start
    while position < stop:
        end = min(stop, (position // source.block + 1) * source.block)
        yield position, end
        position = end


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc=desc, file=sys.stderr, smoothing=0.1)


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _values_equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(b, torch.Tensor):
        a = np.asarray(a)
        b = b.numpy()
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    return a == b


def _convert_range(job: Dict[str, Any], counter=None) -> Dict[str, Any]:
    """Writes source samples [start, stop) to one output; runs in the main
    process or in a worker process (one per shard)."""
    import torch_lmdb

    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    source = job.get("source_obj")
    if source is None:  # a shard's worker: the parent already warned about what is left out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            source = open_source(job["kind"], job["source"], job["skip_mismatched"], job["allow_pickle"],
                                 job.get("group"), job.get("allow_external", False))
    start, stop, out, fields = job["start"], job["stop"], job["output"], job["fields"]
    user = dict(source.provenance)
    user["source"] = {"format": source.format, "path": os.path.abspath(job["source"]),
                      "start": start, "stop": stop, "converted_at": job["converted_at"],
                      "torch_lmdb_version": torch_lmdb.__version__}
    if job.get("group") is not None:
        user["source"]["group"] = job["group"]
    done = 0
    if os.path.exists(out) and job["resume"]:
        existing = torch_lmdb.info(out)
        prior = existing["metadata"].get("user", {}).get("source", {})
        if (prior.get("path") != user["source"]["path"] or (prior.get("start"), prior.get("stop")) != (start, stop)
                or prior.get("group") != job.get("group")):
            group = f" group {prior.get('group')!r}" if prior.get("group") is not None else ""
            raise ConversionError(f"cannot resume '{out}': it was converted from {prior.get('path')!r}{group} "
                                  f"[{prior.get('start')}, {prior.get('stop')}), not this source and range")
        done = existing["num_samples"]
        if existing["complete"] and done == stop - start:
            if counter is not None:
                with counter.get_lock():
                    counter.value += done
            return {"output": out, "written": 0, "resumed_from": done}
        user["source"]["converted_at"] = prior.get("converted_at")
    elif os.path.exists(out) and os.listdir(out):
        raise ConversionError(f"'{out}' already exists; pass --resume to continue an interrupted conversion "
                              f"or remove it first")
    if counter is not None and done:
        with counter.get_lock():
            counter.value += done
    written, writer, created = 0, None, not os.path.exists(out)
    try:
        writer = torch_lmdb.LMDBWriter(out, map_size=job["map_size"], mode="a" if done else "w",
                                       user_metadata=user, commit_every=job["commit_every"],
                                       compression=job.get("compression"))
        if done:
            writer.set_user_metadata(user)
        for position, end in _blocks(source, start + done, stop):
            columns = source.read(position, end, fields)
            for i in range(end - position):
                writer.write({name: columns[name][i] for name in fields})
            written += end - position
            if counter is not None:
                with counter.get_lock():
                    counter.value += end - position
            elif job.get("progress") is not None:
                job["progress"].update(end - position)
    except BaseException:
        empty = writer is None or len(writer) == 0
        if writer is not None:
            writer.abandon()  # commits what was written; the database stays marked incomplete
        if created and empty:  # nothing to resume: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    writer.close()
    return {"output": out, "written": written, "resumed_from": done}


def _worker(job, counter, results):
    try:
        results.put((job["output"], "ok", _convert_range(job, counter)))
    except Interrupted as e:
        results.put((job["output"], "interrupted", str(e)))
    except BaseException as e:  # reported by the parent as one line
        results.put((job["output"], "error", f"{type(e).__name__}: {e}"))


def verify_against_source(source, paths: List[str], ranges: List[Tuple[int, int]], fields: Sequence[str],
                          progress=None, max_errors: int = 10) -> List[str]:
    """Reads every converted sample back and compares it with the source."""
    import torch_lmdb

    problems: List[str] = []
    for path, (start, stop) in zip(paths, ranges):
        ds = torch_lmdb.LMDBDataset(path, verify=True)
        if len(ds) != stop - start:
            problems.append(f"{path}: {len(ds)} samples, expected {stop - start}")
            continue
        for position, end in _blocks(source, start, stop):
            if len(problems) >= max_errors:
                break
            columns = source.read(position, end, fields)
            for i in range(end - position):
                got = ds[position - start + i]
                for name in fields:
                    if name not in got or not _values_equal(columns[name][i], got[name]):
                        problems.append(f"{path}: index {position - start + i} (source index {position + i}), "
                                        f"field {name!r} differs from the source")
            if progress is not None:
                progress.update(end - position)
    return problems


def convert(kind: str, source_path: str, output: str, *, fields: Optional[Sequence[str]] = None,
            limit: Optional[int] = None, shards: int = 1, map_size: Optional[int] = None,
            resume: bool = False, verify: bool = False, skip_mismatched: bool = False,
            progress: bool = False, commit_every: Optional[int] = None, allow_pickle: bool = False,
            group: Optional[str] = None, log=print, compression: str = "lz4",
            allow_external: bool = False, allow_missing_chunks: bool = False) -> List[str]:
    """Converts one source (or one split ``group`` of it) to ``shards`` torch_lmdb databases;
    returns their paths. ``fields`` are relative to ``group``. ``allow_pickle``,
    ``allow_external``: see :func:`open_source`; ``allow_missing_chunks``: see
    :func:`_check_feasible`; ``compression``: see
    :func:`source_compression`. A store with splits needs ``group`` (or :func:`convert_splits`)."""
    source = open_source(kind, source_path, skip_mismatched, allow_pickle, group, allow_external)
    label = f"'{source_path}'" + (f" group '{group}'" if group is not None else "")
    names = list(source.fields)
    if fields:
        unknown = [f for f in fields if f not in source.fields]
        if unknown:
            raise ConversionError(f"{label} has no field(s) {unknown}; available: {names}")
        names = list(fields)
    n = source.num_samples if limit is None else min(limit, source.num_samples)
    if shards < 1 or shards > max(1, n):
        raise ConversionError(f"--shards must be between 1 and the sample count ({n}), got {shards}")
    if os.path.abspath(output) == os.path.abspath(source_path):
        raise ConversionError(f"the output '{output}' is the source itself")
    _check_feasible(source, label, names, n, output, allow_missing_chunks)
    ranges = shard_ranges(n, shards)
    paths = output_paths(output, shards)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    codecs = source_compression(source, names, compression)
    for name in names:
        log(f"{label}: field {name!r}: {codecs[name]}", file=sys.stderr)
    jobs = [dict(kind=kind, source=source_path, skip_mismatched=skip_mismatched, allow_pickle=allow_pickle,
                 allow_external=allow_external,
                 start=a, stop=b, output=p, group=source.group,
                 fields=names, map_size=map_size, resume=resume, commit_every=commit_every, converted_at=stamp,
                 compression=codecs)
            for p, (a, b) in zip(paths, ranges)]
    desc = os.path.basename(source_path.rstrip("/")) + (f"/{group}" if group is not None else "")
    bar = _bar(progress, n, f"converting {desc}")
    t0 = time.perf_counter()
    try:
        if shards == 1:
            jobs[0]["source_obj"] = source
            jobs[0]["progress"] = bar
            old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            try:
                results = [_convert_range(jobs[0])]
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_term)
        else:
            results = _run_shards(jobs, bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    written = sum(r["written"] for r in results)
    present = sum(r["resumed_from"] for r in results)
    target = ", ".join(paths) if len(paths) <= 2 else f"{paths[0]} ... ({len(paths)} shards)"
    if written == 0 and present == n:
        log(f"{target}: already complete ({n:,} samples); nothing to convert", file=sys.stderr)
    else:
        size = sum(os.path.getsize(os.path.join(p, "data.mdb")) for p in paths)
        already = f" ({present:,} already present)" if present else ""
        log(f"converted {written:,} samples{already} in {seconds:.1f} s "
            f"({written / max(seconds, 1e-9):,.0f} samples/s; {_human_bytes(size)} on disk) to {target}",
            file=sys.stderr)
    if verify:
        vbar = _bar(progress, n, "verifying")
        problems = verify_against_source(source, paths, ranges, names, vbar)
        if vbar is not None:
            vbar.close()
        if problems:
            raise ConversionError("verification failed: " + "; ".join(problems[:10]))
        log(f"verified {n:,} samples: equal to the source", file=sys.stderr)
    return paths


def convert_splits(kind: str, source_path: str, output_dir: str, *, groups: Optional[Sequence[str]] = None,
                   log=print, **options) -> Dict[str, List[str]]:
    """Converts each split group of a Zarr store or HDF5 file to ``output_dir/<split>.lmdb``
    (:func:`split_file_name`); returns ``{group: paths}``. ``groups``: some of the splits
    (or any group paths holding arrays); default: every split :func:`find_splits` detects.
    ``options`` go to :func:`convert` for each split (``fields`` and ``limit`` apply per split)."""
    splits, available = store_splits(kind, source_path, options.get("allow_pickle", False),
                                     options.get("allow_external", False))
    if groups:
        chosen = [g.strip("/") for g in groups]
        unknown = [g for g in chosen if g not in available]
        if unknown:
            listed = ", ".join(splits or available) or "none (the store has no groups)"
            raise ConversionError(f"'{source_path}' has no group(s) {', '.join(unknown)}; available: {listed}")
    elif splits:
        chosen = splits
    else:
        raise ConversionError(f"'{source_path}' holds no splits (top-level groups with the same arrays and their "
                              f"own sample count); convert it as one dataset with --output, or name groups with "
                              f"--group (groups: {', '.join(available) or 'none'})")
    files = {g: os.path.join(output_dir, split_file_name(g)) for g in chosen}
    clash = Counter(files.values())
    if any(c > 1 for c in clash.values()):
        raise ConversionError(f"groups {sorted(g for g, f in files.items() if clash[f] > 1)} map to the same "
                              f"database name; convert them one at a time with --group NAME --output PATH")
    out: Dict[str, List[str]] = {}
    for g in chosen:
        out[g] = convert(kind, source_path, files[g], group=g, log=log, **options)
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _run_shards(jobs: List[Dict[str, Any]], bar) -> List[Dict[str, Any]]:
    """One process per shard (at most one per core at a time); returns each job's result."""
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    results = ctx.Queue()
    pending = list(jobs)
    running: Dict[str, Any] = {}
    outcomes: Dict[str, Tuple[str, Any]] = {}
    limit = max(1, min(len(jobs), os.cpu_count() or 1))
    interrupted: Optional[str] = None

    def on_signal(signum, frame):
        nonlocal interrupted
        interrupted = signal.Signals(signum).name
        for proc in running.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker commits and leaves its shard incomplete

    old_int, old_term = signal.signal(signal.SIGINT, on_signal), signal.signal(signal.SIGTERM, on_signal)
    try:
        shown = 0
        while pending or running:
            while pending and len(running) < limit and interrupted is None:
                job = pending.pop(0)
                proc = ctx.Process(target=_worker, args=(job, counter, results), daemon=True)
                proc.start()
                running[job["output"]] = proc
            if interrupted is not None:
                pending.clear()
            try:
                out, status, payload = results.get(timeout=0.2)
                outcomes[out] = (status, payload)
                running.pop(out).join()
            except Exception:  # queue.Empty: poll progress and dead workers
                for out, proc in list(running.items()):
                    if not proc.is_alive() and out not in outcomes:
                        proc.join()
                        if proc.exitcode != 0:
                            outcomes[out] = ("error", f"worker exited with code {proc.exitcode}")
                            running.pop(out)
            if bar is not None:
                value = counter.value
                bar.update(value - shown)
                shown = value
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if interrupted is not None or any(s == "interrupted" for s, _ in outcomes.values()):
        raise Interrupted(interrupted or "SIGINT")
    errors = [f"{out}: {payload}" for out, (status, payload) in sorted(outcomes.items()) if status != "ok"]
    if errors:
        raise ConversionError("; ".join(errors))
    return [outcomes[job["output"]][1] for job in jobs]

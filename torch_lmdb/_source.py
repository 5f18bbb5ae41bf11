"""What every conversion source shares: the errors, the limits, sample values as
LMDBWriter takes them, and ``_ArraySource``, the base of the Zarr and HDF5 sources.

A *source* exposes ``num_samples``, ``fields`` (name -> description), ``block``
(a chunk-aligned read size), ``read(start, stop, fields)`` returning one list
of per-sample values per field, and ``provenance`` (attributes and origin)
stored as the ``user`` metadata of the output.
"""
import base64
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from torch_lmdb._splits import _group_paths, _sample_count, find_splits

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

"""Zarr through zarr-python 2.x or 3.x: metadata checks before reading, and writing helpers.

Reading (used by ``torch-lmdb convert``):
  * :func:`scan_store` parses every metadata file of a directory store itself
    (``.zgroup``/``.zarray``/``.zattrs``/``.zmetadata`` of format 2, ``zarr.json`` of
    format 3) before zarr opens it, so that a corrupt file is named, a format the
    installed zarr cannot read is refused with the reason, and an array using the
    Pickle codec is refused before any chunk is read (unpickling runs code).
  * :class:`RaggedArray` reads the *offsets form* of a ragged array: a group with the
    attribute ``"ragged": true`` holding ``values`` (samples concatenated along the
    first dimension) and ``offsets`` (``n + 1`` int64, ``offsets[0] == 0``): sample i is
    ``values[offsets[i]:offsets[i+1]]``. zarr-python 3 cannot write numcodecs'
    VLenArray, so this is the ragged form both versions write.

Writing (used by the tests and examples/radio_localization/generate.py): one set of
calls that works with either zarr-python: :func:`open_group`, :func:`write_array`,
:func:`write_strings`, :func:`write_ragged`.
"""
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["zarr_major", "writable_formats", "ragged_forms", "scan_store", "RaggedArray", "open_group",
           "create_array", "write_array", "write_strings", "write_ragged", "StoreError"]

_V2_FILES = (".zgroup", ".zarray", ".zattrs", ".zmetadata")


class StoreError(RuntimeError):
    """A Zarr store that cannot (or must not) be read; the message names the file or array."""


def _zarr():
    import zarr

    return zarr


def zarr_major() -> int:
    return int(_zarr().__version__.split(".")[0])


def writable_formats() -> List[int]:
    """Zarr formats the installed zarr-python writes."""
    return [2] if zarr_major() < 3 else [2, 3]


def ragged_forms(zarr_format: int) -> List[str]:
    """Ragged-array forms the installed zarr-python writes in ``zarr_format``:
    ``"vlen"`` (numcodecs.VLenArray object arrays, zarr-python 2 only) and
    ``"offsets"`` (a values + offsets group, any version)."""
    return ["vlen", "offsets"] if zarr_major() < 3 else ["offsets"]


# ---------------------------------------------------------------------------------------
# Reading


def _load_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"Zarr metadata file '{path}' is not valid JSON: {e}") from None
    except OSError as e:
        raise StoreError(f"cannot read Zarr metadata file '{path}': {e.strerror}") from None


def _codec_ids(meta: Dict[str, Any]) -> List[str]:
    """The codec ids (format 2) or names (format 3) an array's metadata lists, nested
    ones (e.g. inside sharding_indexed) included."""
    ids: List[str] = []

    def add(codec):
        if isinstance(codec, dict):
            name = codec.get("id") or codec.get("name")
            if isinstance(name, str):
                ids.append(name)
            config = codec.get("configuration")
            if isinstance(config, dict):
                for key in ("codecs", "index_codecs"):
                    for inner in config.get(key) or []:
                        add(inner)

    for key in ("filters", "codecs"):
        for codec in meta.get(key) or []:
            add(codec)
    add(meta.get("compressor"))
    return ids


def _is_pickle(codec_id: str) -> bool:
    return codec_id.lower().rsplit(".", 1)[-1] == "pickle"  # "pickle", "numcodecs.pickle"


def scan_store(path: str, allow_pickle: bool = False) -> Dict[str, Any]:
    """Checks a directory store's metadata before zarr reads it.

    Returns ``{"format": 2 | 3, "arrays": {name: metadata}}``. Raises
    :class:`StoreError` naming the file for corrupt metadata, naming the array for a
    Pickle codec (unless ``allow_pickle``) or for a codec the installed zarr-python
    cannot read, and naming the reason for a format it cannot read. Stores that are not
    local directories are left to zarr.
    """
    if not os.path.isdir(path):
        return {"format": None, "arrays": {}}
    arrays: Dict[str, Dict[str, Any]] = {}
    formats = set()
    for directory, subdirs, files in os.walk(path):
        subdirs.sort()
        rel = os.path.relpath(directory, path).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        for name in files:
            if name not in _V2_FILES and name != "zarr.json":
                continue
            file = os.path.join(directory, name)
            meta = _load_json(file)
            if not isinstance(meta, dict):
                raise StoreError(f"Zarr metadata file '{file}' holds a {type(meta).__name__}, not an object")
            formats.add(3 if name == "zarr.json" else 2)
            if name == ".zarray" or (name == "zarr.json" and meta.get("node_type") == "array"):
                arrays[rel] = meta
            elif name == ".zmetadata":  # consolidated format 2: {"metadata": {"x/.zarray": {...}}}
                for key, inner in (meta.get("metadata") or {}).items():
                    if key.endswith("/.zarray") or key == ".zarray":
                        arrays.setdefault("/".join(p for p in (rel, key[: -len(".zarray")].rstrip("/")) if p),
                                          inner)
            if name == "zarr.json":  # consolidated format 3 lives in the group's own zarr.json
                consolidated = (meta.get("consolidated_metadata") or {}).get("metadata") or {}
                for key, inner in consolidated.items():
                    if isinstance(inner, dict) and inner.get("node_type") == "array":
                        arrays.setdefault("/".join(p for p in (rel, key) if p), inner)
    store_format = 3 if 3 in formats else (2 if formats else None)
    major = zarr_major()
    if store_format == 3 and major < 3:
        raise StoreError(f"'{path}' is a Zarr format 3 store (zarr.json); zarr-python {_zarr().__version__} "
                         f"reads format 2 only: convert it with zarr-python >= 3")
    for name, meta in sorted(arrays.items()):
        ids = _codec_ids(meta)
        label = name or os.path.basename(path.rstrip("/"))
        if any(_is_pickle(c) for c in ids) and not allow_pickle:
            raise StoreError(f"'{path}': array '{label}' uses the Pickle codec: reading it runs code stored in the "
                             f"file; pass --allow-pickle (allow_pickle=True) only for a store you trust")
        if major >= 3 and any(c.lower() in ("vlen-array", "numcodecs.vlen-array") for c in ids):
            raise StoreError(f"'{path}': array '{label}' is a ragged VLenArray array, which zarr-python "
                             f"{_zarr().__version__} cannot read; convert it with zarr-python 2, or store it "
                             f"as a ragged group (values + offsets, see README)")
    return {"format": store_format, "arrays": arrays}


class RaggedArray:
    """The offsets form of a ragged array as an object array of per-sample numpy arrays."""

    def __init__(self, group, name: str):
        try:
            self._values, self._offsets = readable(group["values"]), group["offsets"]
        except KeyError:
            raise StoreError(f"ragged group '{name}' needs the arrays 'values' and 'offsets'") from None
        if len(self._offsets.shape) != 1 or self._offsets.shape[0] < 1:
            raise StoreError(f"ragged group '{name}': 'offsets' has shape {list(self._offsets.shape)}, "
                             f"expected [samples + 1]")
        self.name = name
        self.shape = (self._offsets.shape[0] - 1,)
        self.dtype = np.dtype(object)
        self.chunks = self._offsets.chunks
        self.shards = None
        self.attrs = group.attrs

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("ragged arrays are read in contiguous slices")
            offsets = np.asarray(self._offsets[start:stop + 1], dtype=np.int64)
            if len(offsets) == 0:
                return np.empty(0, dtype=object)
            values = np.asarray(self._values[int(offsets[0]):int(offsets[-1])])
            if np.any(np.diff(offsets) < 0) or offsets[-1] - offsets[0] != len(values):
                raise StoreError(f"ragged group '{self.name}': offsets [{start}, {stop}] are not increasing "
                                 f"within 'values' ({self._values.shape[0]} rows)")
            out = np.empty(len(offsets) - 1, dtype=object)
            for i in range(len(out)):
                out[i] = values[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]]
            return out
        if key is Ellipsis:
            return self[0:self.shape[0]]
        return self[key:key + 1][0]


# ---------------------------------------------------------------------------------------
# Writing (tests, examples)


def readable(array):
    """``array``, readable. zarr-python 3.0 parses a format 2 complex array's
    fill value, stored as ``[real, imag]``, into two complex numbers, and then
    fails on every read ("could not broadcast input array from shape (2,)"):
    the opened array's (in-memory) fill value is set to the complex number the
    file states. The store is not modified."""
    if zarr_major() < 3:
        return array
    try:
        meta = array._async_array.metadata
        fill = getattr(meta, "fill_value", None)
        if (getattr(meta, "zarr_format", None) == 2 and np.dtype(array.dtype).kind == "c"
                and isinstance(fill, np.ndarray) and fill.shape == (2,)):
            value = np.array(complex(float(np.real(fill[0])), float(np.real(fill[1]))), dtype=array.dtype)[()]
            object.__setattr__(meta, "fill_value", value)
    except AttributeError:  # another zarr-python 3 layout: nothing to repair
        pass
    return array


def open_group(path: str, mode: str = "w", zarr_format: Optional[int] = None):
    """A root group; ``zarr_format`` 2 or 3 (zarr-python 2 writes only 2)."""
    zarr = _zarr()
    if zarr_major() < 3:
        if zarr_format not in (None, 2):
            raise ValueError(f"zarr-python {zarr.__version__} writes Zarr format 2 only, not {zarr_format}")
        return zarr.open_group(str(path), mode=mode)
    return zarr.open_group(str(path), mode=mode, zarr_format=zarr_format or 3)


def _format_of(group) -> int:
    return 2 if zarr_major() < 3 else group.metadata.zarr_format


def create_array(group, name: str, shape: Sequence[int], dtype, chunks: Optional[Sequence[int]] = None,
                 shards: Optional[Sequence[int]] = None, attrs: Optional[Dict[str, Any]] = None):
    """An empty (zero-filled) numeric, bool or fixed-length string array; ``shards``
    needs Zarr format 3."""
    if zarr_major() < 3:
        if shards is not None:
            raise ValueError(f"zarr-python {_zarr().__version__} cannot write sharded arrays")
        array = group.zeros(name, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks) if chunks else True)
    else:
        with warnings.catch_warnings():  # fixed-length strings are "not part of the v3 spec" yet
            warnings.simplefilter("ignore", UserWarning)
            array = group.create_array(name, shape=tuple(shape), dtype=dtype,
                                       chunks=tuple(chunks) if chunks else "auto",
                                       shards=tuple(shards) if shards else None)
    if attrs:
        array.attrs.update(attrs)
    return array


def write_array(group, name: str, data, chunks: Optional[Sequence[int]] = None,
                shards: Optional[Sequence[int]] = None, attrs: Optional[Dict[str, Any]] = None):
    """A numeric, bool or fixed-length string (``U``/``S``) array with its data."""
    data = np.asarray(data)
    array = create_array(group, name, data.shape, data.dtype, chunks, shards, attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        array[...] = data
    return array


def write_strings(group, name: str, values: Sequence, chunks: Sequence[int], kind: str = "str",
                  attrs: Optional[Dict[str, Any]] = None):
    """A variable-length str or bytes array (numcodecs VLenUTF8 / VLenBytes, or the
    vlen-utf8 / vlen-bytes codecs of format 3)."""
    import numcodecs

    data = np.empty(len(values), dtype=object)
    data[:] = list(values)
    codec = numcodecs.VLenUTF8() if kind == "str" else numcodecs.VLenBytes()
    if zarr_major() < 3:
        array = group.create_dataset(name, shape=data.shape, dtype=object, object_codec=codec, chunks=tuple(chunks))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if _format_of(group) == 2:
                array = group.create_array(name, shape=data.shape, dtype=object, chunks=tuple(chunks),
                                           filters=[codec])
            else:
                array = group.create_array(name, shape=data.shape, dtype=str if kind == "str" else bytes,
                                           chunks=tuple(chunks))
    array[...] = data
    if attrs:
        array.attrs.update(attrs)
    return array


def write_ragged(group, name: str, arrays: Sequence[np.ndarray], chunks: int, form: str = "offsets",
                 attrs: Optional[Dict[str, Any]] = None):
    """A ragged array: sample i is ``arrays[i]`` (any first dimension).

    ``form="vlen"``: a numcodecs.VLenArray object array of the flattened samples
    (zarr-python 2 only; pass ``attrs={"element_shape": [-1, ...]}`` to keep the shape).
    ``form="offsets"``: a group ``name`` with ``"ragged": true`` holding ``values`` and
    ``offsets`` (see :class:`RaggedArray`).
    """
    import numcodecs

    arrays = [np.asarray(a) for a in arrays]
    dtype = arrays[0].dtype if arrays else np.dtype("f4")
    if form == "vlen":
        if zarr_major() >= 3:
            raise ValueError(f"zarr-python {_zarr().__version__} cannot write VLenArray arrays; use form='offsets'")
        array = group.create_dataset(name, shape=(len(arrays),), dtype=object, chunks=(chunks,),
                                     object_codec=numcodecs.VLenArray(dtype.str))
        data = np.empty(len(arrays), dtype=object)
        data[:] = [a.ravel() for a in arrays]
        array[...] = data
        if attrs:
            array.attrs.update(attrs)
        return array
    if form != "offsets":
        raise ValueError(f"unknown ragged form {form!r}; expected 'vlen' or 'offsets'")
    sub = group.create_group(name)
    sub.attrs.update(dict(attrs or {}, ragged=True))
    lengths = [a.shape[0] if a.ndim else 1 for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rest = arrays[0].shape[1:] if arrays else ()
    values = np.concatenate([a.reshape((-1,) + rest) for a in arrays]) if arrays else np.empty((0,) + rest, dtype)
    rows = max(1, int(offsets[min(chunks, len(arrays))]))  # about `chunks` samples of values a chunk
    write_array(sub, "values", values, chunks=(rows,) + tuple(rest))
    write_array(sub, "offsets", offsets, chunks=(chunks,))
    return sub

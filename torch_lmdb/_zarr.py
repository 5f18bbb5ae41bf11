"""Zarr through zarr-python 2.x or 3.x: metadata checks before reading, and writing helpers.

Reading (used by ``torch-lmdb convert``):
  * :func:`open_store` opens a store (directory, ``.zip``, URL) so that every metadata
    file zarr reads (``.zgroup``/``.zarray``/``.zattrs``/``.zmetadata``, ``zarr.json``) is
    checked first: a FIFO, a device or a file over ``METADATA_LIMIT`` is refused, a corrupt
    one is named; and every array is checked by :func:`check_array` before any chunk is
    decoded: the Pickle codec (unpickling runs code), a codec the installed zarr cannot
    read, impossible shapes. zarr-python 2 reads through a checking view of its store;
    zarr-python 3 scans a local directory first (:func:`scan_store`) and checks each array
    as it is opened (:func:`checked`).
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
import stat
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["zarr_major", "writable_formats", "ragged_forms", "open_store", "checked", "check_array", "RaggedArray", "open_group",
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


# Metadata files larger than this are refused (SECURITY.md): a real one is a few KiB.
METADATA_LIMIT = 64 << 20
_META_FILES = frozenset(_V2_FILES + ("zarr.json",))


def _parse_json(data: bytes, file: str) -> Any:
    try:
        meta = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"Zarr metadata file '{file}' is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise StoreError(f"Zarr metadata file '{file}' holds a {type(meta).__name__}, not an object")
    return meta


def _check_entry(file: str, regular: bool, size: int) -> None:
    """Refuses a metadata entry that is not a regular file (a FIFO blocks, /dev/zero never
    ends) or is larger than METADATA_LIMIT, before anything reads it."""
    if not regular:
        raise StoreError(f"Zarr metadata file '{file}' is not a regular file (a device, FIFO or socket)")
    if size > METADATA_LIMIT:
        raise StoreError(f"Zarr metadata file '{file}' holds {size} bytes, more than the "
                         f"{METADATA_LIMIT >> 20} MiB a metadata file may hold")


def _load_json(path: str) -> Any:
    try:
        st = os.stat(path)
        _check_entry(path, stat.S_ISREG(st.st_mode), st.st_size)
        with open(path, "rb") as f:
            data = f.read(METADATA_LIMIT + 1)
    except OSError as e:
        raise StoreError(f"cannot read Zarr metadata file '{path}': {e.strerror}") from None
    return _parse_json(data, path)


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


def check_array(store: str, name: str, meta: Dict[str, Any], allow_pickle: bool = False) -> None:
    """Refuses an array, from its metadata (a .zarray or zarr.json dict, or what zarr-python
    3 parsed), before any of its chunks (or a format 2 object fill value) is decoded: a Pickle
    codec unless ``allow_pickle``, a codec the installed zarr-python cannot read, a negative
    dimension or a chunk dimension below 1. The message names ``store`` and the array."""
    label = f"'{store}': array '{name}'"
    ids = _codec_ids(meta)
    if any(_is_pickle(c) for c in ids) and not allow_pickle:
        raise StoreError(f"{label} uses the Pickle codec: reading it runs code stored in the file; "
                         f"pass --allow-pickle (allow_pickle=True) only for a store you trust")
    if zarr_major() >= 3 and any(c.lower() in ("vlen-array", "numcodecs.vlen-array") for c in ids):
        raise StoreError(f"{label} is a ragged VLenArray array, which zarr-python {_zarr().__version__} "
                         f"cannot read; convert it with zarr-python 2, or store it as a ragged group "
                         f"(values + offsets, see README)")
    grid = meta.get("chunk_grid")
    chunks = ((grid.get("configuration") or {}).get("chunk_shape") if isinstance(grid, dict)
              else meta.get("chunks"))
    for what, dims, low in (("shape", meta.get("shape"), 0), ("chunk shape", chunks, 1)):
        if isinstance(dims, (list, tuple)) and any(not isinstance(d, int) or d < low for d in dims):
            raise StoreError(f"{label} has {what} {list(dims)}: every dimension must be an integer >= {low}")


def scan_store(path: str, allow_pickle: bool = False) -> None:
    """zarr-python 3 and a local directory store: checks every metadata file (type, size,
    JSON) and every array's (:func:`check_array`) before zarr reads them, so that what
    zarr-python 3 would fail to open is refused with the reason."""
    if not os.path.isdir(path):
        return
    for directory, subdirs, files in os.walk(path, followlinks=True):
        subdirs.sort()
        for name in sorted(set(files) & _META_FILES):
            meta = _load_json(os.path.join(directory, name))
            if name == ".zarray" or (name == "zarr.json" and meta.get("node_type") == "array"):
                rel = os.path.relpath(directory, path).replace(os.sep, "/")
                check_array(path, os.path.basename(path.rstrip("/")) if rel == "." else rel, meta, allow_pickle)


def _store_class():
    """zarr-python 2: the read-only store view that checks each metadata entry as zarr reads it."""
    zarr = _zarr()

    class CheckedStore(zarr.storage.Store):
        """Every metadata entry zarr asks for (``.zarray``, ``.zattrs``, ...) is checked
        before it is read (:func:`_check_entry`: no FIFO, device or oversized file; names the
        file), and every ``.zarray`` is checked (:func:`check_array`) before zarr decodes it,
        so nothing in it (an object fill value) and no chunk is unpickled. Works for every
        store zarr opens from a path: a directory (symlinked or not), a ``.zip``, an URL."""

        def __init__(self, inner, label: str, allow_pickle: bool):
            self._inner, self._label, self._allow_pickle = inner, label, allow_pickle

        def _entry(self, key: str):
            """(regular file, size) of ``key`` without reading it, or None when absent."""
            inner = self._inner
            try:
                if hasattr(inner, "zf"):  # ZipStore
                    info = inner.zf.getinfo(key)
                    return not info.is_dir(), info.file_size
                if hasattr(inner, "fs"):  # FSStore (URLs)
                    info = inner.fs.info(inner.map._key_to_str(inner._normalize_key(key)))
                    return info.get("type") == "file", int(info.get("size") or 0)
                st = os.stat(os.path.join(inner.path, key))  # DirectoryStore
                return stat.S_ISREG(st.st_mode), st.st_size
            except (KeyError, FileNotFoundError, NotADirectoryError):
                return None

        def _checked(self, key: str) -> bool:
            entry = self._entry(key) if key.rsplit("/", 1)[-1] in _META_FILES else None
            if entry is not None:
                _check_entry(f"{self._label}/{key}", *entry)
            return entry is not None

        def __contains__(self, key):
            return self._checked(key) or key in self._inner

        def __getitem__(self, key):
            if not self._checked(key):
                return self._inner[key]
            data = self._inner[key]
            meta = _parse_json(data, f"{self._label}/{key}")
            if key.endswith(".zarray"):
                name = key[: -len(".zarray")].strip("/") or os.path.basename(self._label.rstrip("/"))
                check_array(self._label, name, meta, self._allow_pickle)
            return data

        def __iter__(self):
            return iter(self._inner)

        def __len__(self):
            return len(self._inner)

        def listdir(self, path=None):
            return zarr.storage.listdir(self._inner, path)

        def __setitem__(self, key, value):
            raise PermissionError(f"'{self._label}' is opened read-only")

        __delitem__ = __setitem__

    return CheckedStore


def open_store(path: str, allow_pickle: bool = False):
    """``zarr.open(path, mode="r")`` (an array or a group), with every metadata file checked
    and every array checked by :func:`check_array` before zarr decodes it. zarr-python 2 reads
    through a checking view of the store it opens (directory, ``.zip``, URL); zarr-python 3
    checks a local directory's metadata files first, and each array when it is opened
    (:func:`checked`). Raises :class:`StoreError` naming the file, the array or the reason."""
    zarr = _zarr()
    if zarr_major() >= 3:
        # Only a local directory is checked before zarr-python 3 reads it: a
        # .zip or a URL store would be read unchecked, so it is refused.
        if not os.path.isdir(path):
            raise StoreError(f"'{path}' is not a local directory store: with zarr-python {zarr.__version__} "
                             f"torch-lmdb checks a store before reading it only as a directory (unpack a .zip, "
                             f"copy a remote store)")
        scan_store(os.path.realpath(path), allow_pickle)
        return zarr.open(os.path.realpath(path), mode="r")
    store = _store_class()(zarr.storage.normalize_store_arg(path, mode="r"), path.rstrip("/"), allow_pickle)
    if "zarr.json" in store and ".zgroup" not in store and ".zarray" not in store:
        raise StoreError(f"'{path}' is a Zarr format 3 store (zarr.json); zarr-python {zarr.__version__} "
                         f"reads format 2 only: convert it with zarr-python >= 3")
    return zarr.open(store, mode="r")


def checked(store: str, name: str, array, allow_pickle: bool = False):
    """``array`` (opened by :func:`open_store`) after :func:`check_array`; zarr-python 2
    checked it as it opened it, zarr-python 3 from the metadata it parsed (which decodes no
    chunk)."""
    if zarr_major() >= 3:
        check_array(store, name, array.metadata.to_dict(), allow_pickle)
    return array


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

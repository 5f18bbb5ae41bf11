"""LMDBWriter: create or append torch_lmdb databases from Python."""
import json
import numbers
import os
import warnings
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from torch_lmdb import _C

__all__ = ["LMDBWriter"]

_TENSOR, _STR, _BYTES = 0, 1, 2

#: The smallest initial map size: smaller ``map_size`` values are raised to it
#: (LMDB needs a few pages for its own tables before any sample is written).
MIN_MAP_SIZE = 1 << 20
_MAX_SIZE = 2**63 - 1  # sizes cross to C++ as size_t and to LMDB as off_t


def _field(name: Any, value: Any):
    """Converts one sample value to the (name, kind, payload) the C++ writer takes."""
    if not isinstance(name, str):
        raise TypeError(f"field names must be str, got {type(name).__name__} ({name!r})")
    if isinstance(value, torch.Tensor):
        return (name, _TENSOR, value.detach())
    if isinstance(value, str):
        try:
            return (name, _STR, value.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"field {name!r}: str {value[max(0, e.start - 10):e.end + 10]!a} cannot be stored: "
                             f"{e.reason} at position {e.start} (str values must be encodable as UTF-8; store "
                             f"bytes instead)") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (name, _BYTES, bytes(value))
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)  # keeps 0-dim for numpy scalars
        if not array.dtype.isnative:  # big-endian data: stored as its values, in native order
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        try:
            if not array.flags.writeable:  # the writer only reads it: no need for torch's warning
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return (name, _TENSOR, torch.from_numpy(array))
            return (name, _TENSOR, torch.from_numpy(array))
        except TypeError as e:
            hint = (f"; torch >= 2.3 has torch.{array.dtype.name}" if array.dtype.name in ("uint16", "uint32", "uint64")
                    else "")
            raise TypeError(f"field {name!r}: numpy dtype {array.dtype} has no torch equivalent in torch "
                            f"{torch.__version__} ({e}){hint}") from None
    if isinstance(value, bool):
        return (name, _TENSOR, torch.tensor(value, dtype=torch.bool))
    if isinstance(value, numbers.Integral):
        if not -(2**63) <= int(value) < 2**63:
            raise OverflowError(f"field {name!r}: int {int(value)} does not fit in int64; store it as str or bytes")
        return (name, _TENSOR, torch.tensor(int(value), dtype=torch.int64))
    if isinstance(value, numbers.Real):
        return (name, _TENSOR, torch.tensor(float(value), dtype=torch.float64))
    if isinstance(value, numbers.Complex):
        return (name, _TENSOR, torch.tensor(complex(value), dtype=torch.complex128))
    raise TypeError(
        f"field {name!r} has unsupported type {type(value).__name__}; "
        "expected a torch.Tensor, numpy array, int, float, bool, complex, str or bytes"
    )


def _codec_spec(value: Any, what: str) -> str:
    """One codec as the C++ writer's spec: "none", "lz4", "zstd", "zstd:5" or ("zstd", 5); None is
    "" (the writer's automatic choice: raw in a new database, the database's codecs when appending)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return f"{value[0]}:{value[1]}"
    raise TypeError(f"compression for {what}: expected None, 'none', 'lz4', 'zstd', 'zstd:5' or ('zstd', 5), "
                    f"got {value!r}")


def _compression_options(compression: Any) -> "tuple[str, dict]":
    """``compression=`` as (default spec, {field: spec})."""
    if isinstance(compression, Mapping):
        per_field = {}
        for name, value in compression.items():
            if not isinstance(name, str):
                raise TypeError(f"compression: field names must be str, got {name!r}")
            per_field[name] = _codec_spec(value, f"field {name!r}") or "none"
        return "none", per_field
    return _codec_spec(compression, "every field"), {}


def _as_dict(sample: Any) -> dict:
    if type(sample) is dict:
        return sample
    if not isinstance(sample, Mapping):
        raise TypeError(f"a sample must be a mapping of field name to value, got {type(sample).__name__}")
    return dict(sample)


class LMDBWriter:
    """Writes samples to a torch_lmdb database (a directory).

    Args:
        path: database directory (created if missing).
        map_size: initial map size in bytes; optional, the map grows by
            itself. Values below ``MIN_MAP_SIZE`` (1 MiB) are raised to it.
        mode: ``"w"`` creates (refuses a database that already holds samples),
            ``"a"`` appends (or creates).
        commit_every: commit after this many samples (default 4096; also every 16 MiB).
        checksum: store an xxh3-64 checksum with every record.
        user_metadata: JSON-serializable dict stored as metadata ``user``.
        commit_bytes: commit after this many encoded bytes (default 16 MiB).
        auto_grow: grow the map on MDB_MAP_FULL (else raise MapFullError).
        compression: Blosc compression (byte shuffle) of tensor fields:
            ``None`` (raw in a new database; when appending, each field
            keeps the codec the database stores it with), ``"none"``
            (raw), ``"lz4"``, ``"zstd"``, with an optional level
            1-9 as ``"zstd:5"`` or ``("zstd", 5)`` (default 5); or a dict
            ``{field: codec}`` (fields not named are stored raw). str and
            bytes fields, payloads under 128 bytes and payloads Blosc does not
            shrink are stored raw (each record names its fields' codecs, so
            every record decodes alone). An unknown codec, or a field the
            samples do not have, raises ValueError naming the field.
        format_version: format of a new database. ``None`` (default): 5
            when compressing (compact records, and tensor payloads under 128
            bytes compressed across about 2 KiB of consecutive samples of a
            value: columns), 4 when only packing (compact records, which name
            each field by its position in the schema: about 20 bytes less per
            field), else 2; or 5, 4 (no columns), 2, or 1 (readable by
            torch_lmdb versions without compression; no codec).
        samples_per_value: how many samples share one LMDB value in a new
            database. ``None`` (default): one without compression; with
            compression, enough for about 128 KiB per value (LMDB gives each
            value above ~2 KiB whole 4 KiB pages of its own, so small
            compressed samples stored alone waste up to half the file).
            Every sample is still read and decoded alone. Appending keeps
            the database's packing.
        compress_threads: threads that compress each batch of samples when
            some field has a codec, while the previous batch is committed.
            ``None`` (default): the machine's cores, at most 8 (1 when LZ4 is
            the only codec on a machine of 2 cores or fewer); ``1``: each
            sample is compressed in ``write()``. The stored records are the
            same either way.

    Used as a context manager, a clean exit marks the database complete; an
    exception keeps every sample written so far but leaves it marked incomplete.
    """

    def __init__(
        self,
        path: "os.PathLike | str",
        map_size: Optional[int] = None,
        mode: str = "w",
        commit_every: Optional[int] = None,
        checksum: bool = True,
        user_metadata: Optional[Mapping[str, Any]] = None,
        commit_bytes: Optional[int] = None,
        auto_grow: bool = True,
        compression: "None | str | tuple | Mapping[str, Any]" = None,
        format_version: Optional[int] = None,
        samples_per_value: Optional[int] = None,
        compress_threads: Optional[int] = None,
    ):
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        for name, value in (("map_size", map_size), ("commit_every", commit_every), ("commit_bytes", commit_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= _MAX_SIZE):
                raise ValueError(f"{name} must be an int from 1 to 2**63 - 1, got {value!r}")
        if samples_per_value is not None and (isinstance(samples_per_value, bool)
                                              or not isinstance(samples_per_value, int)
                                              or not 1 <= samples_per_value <= _C.MAX_SAMPLES_PER_VALUE):
            raise ValueError(f"samples_per_value must be an int from 1 to {_C.MAX_SAMPLES_PER_VALUE} "
                             f"(or None: automatic), got {samples_per_value!r}")
        if compress_threads is not None and (isinstance(compress_threads, bool)
                                             or not isinstance(compress_threads, int)
                                             or not 1 <= compress_threads <= _C.MAX_COMPRESS_THREADS):
            raise ValueError(f"compress_threads must be an int from 1 to {_C.MAX_COMPRESS_THREADS} "
                             f"(or None: automatic), got {compress_threads!r}")
        if map_size is not None:
            map_size = max(map_size, MIN_MAP_SIZE)  # a tiny map is only an initial size: it grows
        self.path = os.fspath(path)
        user_json = json.dumps(dict(user_metadata)) if user_metadata is not None else ""
        default_codec, field_codecs = _compression_options(compression)
        self._w = _C.Writer(
            self.path,
            append=(mode == "a"),
            map_size=map_size or 0,
            commit_every=commit_every or 0,
            commit_bytes=commit_bytes or 0,
            checksum=checksum,
            auto_grow=auto_grow,
            user_json=user_json,
            compression=default_codec,
            field_compression=field_codecs,
            format_version=format_version or 0,
            samples_per_value=samples_per_value or 0,
            compress_threads=compress_threads or 0,
        )

    def write(self, sample: Mapping[str, Any]) -> int:
        """Appends one sample (a mapping of field name to value); returns its index."""
        return self._w.write(_as_dict(sample), _field)

    def write_many(self, samples: Iterable[Mapping[str, Any]], progress: bool = False, total: Optional[int] = None) -> int:
        """Writes every sample of an iterable; returns how many were written.

        The loop runs in C++ (values of the common types are converted there
        too), and commits overlap the encoding of the next samples.
        ``progress=True`` shows a tqdm bar (samples/s).
        """
        if progress:
            from tqdm import tqdm

            if total is None and hasattr(samples, "__len__"):
                total = len(samples)  # type: ignore[arg-type]
            samples = tqdm(samples, total=total, unit="sample", desc=f"writing {os.path.basename(self.path)}")
        return self._w.write_many(map(_as_dict, samples), _field)

    def set_user_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Merges ``metadata`` into the stored ``user`` metadata."""
        self._w.set_user_metadata(json.dumps(dict(metadata)))

    def flush(self) -> None:
        """Commits the pending samples (the database stays marked incomplete)."""
        self._w.flush()

    def close(self) -> None:
        """Commits, marks the database complete and syncs it. Idempotent."""
        self._w.close()

    def abandon(self) -> None:
        """Commits what was written but leaves the database marked incomplete."""
        self._w.abandon()

    @property
    def closed(self) -> bool:
        return self._w.closed

    @property
    def map_size(self) -> int:
        return self._w.map_size

    def __len__(self) -> int:
        return len(self._w)

    def __enter__(self) -> "LMDBWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} samples"
        return f"LMDBWriter({self.path!r}, {state})"

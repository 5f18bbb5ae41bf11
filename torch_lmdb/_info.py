"""What a path holds: :func:`info` describes a database or a shard directory;
:func:`missing_database` is the error for a path that holds none."""
import errno
import json
import os
import warnings
from typing import Any, Dict, Union

from torch_lmdb import _C

__all__ = ["info"]

PathLike = Union[str, "os.PathLike[str]"]


def missing_database(path: str, reason: str = "no such file or directory") -> FileNotFoundError:
    """The error for a path that holds no database (``errno`` ENOENT,
    ``filename`` the path): one message for the library and the CLI."""
    return FileNotFoundError(errno.ENOENT, f"no torch_lmdb database ({reason})", path)


def check_database_path(path: str) -> None:
    """FileNotFoundError when nothing exists at ``path``."""
    if not os.path.exists(path):
        raise missing_database(path)


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


def _shards_codec(field: Dict[str, Any], metas) -> Dict[str, Any]:
    """:func:`_with_codec` over the shards (metadata ``metas``): the codec and
    level when every shard has the same (else ``codec`` "mixed" and each shard's
    in ``codecs``), the byte counts summed (None when a shard's are unknown)."""
    per_shard = [_with_codec(field, meta) for meta in metas]
    out = dict(per_shard[0])
    specs = [(f["codec"], f["level"]) for f in per_shard]
    if len(set(specs)) > 1:
        out.update(codec="mixed", level=None, codecs=[c if c == "none" else f"{c}:{lv}" for c, lv in specs])
    for key in ("stored_bytes", "raw_bytes"):
        values = [f[key] for f in per_shard]
        out[key] = None if any(v is None for v in values) else sum(values)
    return out


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
        "fields": [_shards_codec(f, metas) for f in reader.schema()],
        "file_size": sum(s["file_size"] for s in shards),
        "map_size": sum(reader.map_size(i) for i in range(len(shards))),
        "metadata": metas[0],
        "manifest": manifest,
        "shards": shards,
        "selections": _C.list_selections(path),
    }

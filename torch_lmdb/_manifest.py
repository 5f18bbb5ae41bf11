"""Shard directories: ``manifest.json`` plus one torch_lmdb database per shard.

The writer side (used by :mod:`torch_lmdb.dask` and ``torch-lmdb convert
--dask``): each shard is written to a temporary name and renamed into place by
the task that owns it (no lock between writers), then :func:`write_manifest`
runs last, once every shard is complete, and replaces ``manifest.json``
atomically. The reader side lives in C++ (``Reader("out/")`` expands the
manifest and checks every shard against it); :func:`read_manifest` is the same
check in Python for ``torch-lmdb info`` and ``verify``.

Manifest (format "torch_lmdb.manifest", version 2; docs/FORMAT.md)::

    {"format": "torch_lmdb.manifest", "format_version": 2,
     "dataset_id": "<32 hex digits, drawn when the manifest is written>",
     "num_samples": 1000,
     "schema": [{"name": "x", "kind": "tensor", "dtype": "float32", "shape": [3]}, ...],
     "codecs": {"x": "none", ...},
     "source": {...provenance of the data...},
     "created_with": {"torch_lmdb": "0.1.0"}, "created_at": "2026-...",
     "shards": [{"path": "shard-00000.lmdb", "num_samples": 500,
                 "meta_xxh3_64": "<16 hex digits of xxh3-64 of the shard's metadata JSON>",
                 "size": <bytes of data.mdb>, "data_xxh3_64": "<16 hex digits of xxh3-64 of data.mdb>"},
                ...]}

``size`` and ``data_xxh3_64`` let a copy of a shard be checked whole (a
dataset staged from a URL or a shared file system to a local cache, README
"Remote and shared storage"); :func:`add_hashes` (``torch-lmdb manifest
--hash``) adds them to a directory written without them.
"""
import datetime
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from torch_lmdb import _C

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "torch_lmdb.manifest"
MANIFEST_VERSION = 2
_TMP_RE = re.compile(r"^\.shard-\d+\.lmdb\.tmp-[0-9a-f]+$")


class ManifestError(ValueError):
    """A shard directory that is incomplete, or a shard that does not match its manifest."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.lmdb"


def is_manifest_dir(path: "os.PathLike | str") -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_NAME))


def shard_like_entries(path: str) -> List[str]:
    """Sub-directories of ``path`` holding an LMDB data file."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [n for n in names if os.path.isfile(os.path.join(path, n, "data.mdb"))]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_record(path: str) -> Dict[str, Any]:
    """What the manifest says of one finished shard database (read back from it)."""
    reader = _C.Reader([path])
    reader.take_warnings()
    meta_json = reader.metadata_json(0)
    meta = json.loads(meta_json)
    if not meta.get("complete", False):
        raise ManifestError(f"shard '{path}' is incomplete (its writer did not close cleanly)")
    return {"path": os.path.basename(path.rstrip("/")), "num_samples": len(reader),
            "meta_xxh3_64": _C.metadata_checksum(meta_json), "schema": meta.get("schema", []), "meta": meta}


def write_shard(out_dir: str, k: int, samples: Iterable[Mapping[str, Any]], *,
                map_size: Optional[int] = None, commit_every: Optional[int] = None,
                user_metadata: Optional[Mapping[str, Any]] = None, compression=None,
                format_version: Optional[int] = None) -> Dict[str, Any]:
    """Writes ``samples`` as shard ``k`` of ``out_dir``: to a temporary name,
    then renamed to ``shard-<k>.lmdb``, replacing what an earlier attempt of
    the same shard left (a task re-run after a worker died starts clean).
    Returns :func:`shard_record` of the shard (without its full metadata).
    ``compression``, ``format_version``: as :class:`LMDBWriter`'s."""
    from torch_lmdb.writer import LMDBWriter

    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, shard_name(k))
    tmp = os.path.join(out_dir, f".{shard_name(k)}.tmp-{uuid.uuid4().hex}")
    try:
        with LMDBWriter(tmp, map_size=map_size, commit_every=commit_every, compression=compression,
                        format_version=format_version, user_metadata=dict(user_metadata or {})) as writer:
            for sample in samples:
                writer.write(sample)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = shard_record(final)
    record.pop("meta")
    return record


def _merge_schemas(records: Sequence[Dict[str, Any]], out_dir: str) -> List[Dict[str, Any]]:
    """The shared schema: equal names, kinds, dtypes and ranks; a dimension
    that differs between shards becomes -1."""
    merged: Optional[List[Dict[str, Any]]] = None
    first = None
    for r in records:
        schema = r["schema"]
        if merged is None:
            merged, first = [dict(f, shape=list(f["shape"])) for f in schema], r["path"]
            continue
        same = len(schema) == len(merged) and all(
            a["name"] == b["name"] and a["kind"] == b["kind"] and a["dtype"] == b["dtype"]
            and len(a["shape"]) == len(b["shape"]) for a, b in zip(schema, merged))
        if not same:
            raise ManifestError(f"shard '{os.path.join(out_dir, r['path'])}' has other fields or dtypes than "
                                f"'{os.path.join(out_dir, first)}': {schema} vs {merged}")
        for a, b in zip(schema, merged):
            b["shape"] = [x if x == y else -1 for x, y in zip(a["shape"], b["shape"])]
    return merged or []


def _codecs(meta: Mapping[str, Any], schema: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per-field codecs as the shard metadata states them ("none" when it states none)."""
    stated = meta.get("codecs") or meta.get("compression")
    out: Dict[str, Any] = {}
    for f in schema:
        codec = f.get("codec", f.get("compression"))
        if codec is None and isinstance(stated, Mapping):
            codec = stated.get(f["name"])
        if codec is None and stated is not None and not isinstance(stated, Mapping):
            codec = stated
        if isinstance(codec, Mapping):  # the writer's entry: {"codec", "level", "raw_bytes", "stored_bytes"}
            name = codec.get("codec", "none")
            codec = f"{name}:{codec['level']}" if name != "none" and codec.get("level") is not None else name
        out[f["name"]] = codec if codec is not None else "none"
    return out


def write_manifest(out_dir: str, records: Sequence[Dict[str, Any]], source: Optional[Mapping[str, Any]] = None
                   ) -> Dict[str, Any]:
    """Writes ``out_dir/manifest.json`` for the shards of ``records`` (in their
    order; shards of 0 samples are removed and left out) atomically: a
    temporary file, fsync, rename, fsync of the directory. Each shard is
    re-read here, so the manifest states what is on disk."""
    import torch_lmdb

    from torch_lmdb.writer import LMDBWriter

    kept = []
    for r in records:
        path = os.path.join(out_dir, r["path"])
        if shard_record(path)["num_samples"] == 0:
            shutil.rmtree(path)
            continue
        kept.append(path)
    if not kept:
        raise ManifestError(f"no samples were written to '{out_dir}' (every shard is empty)")
    # Each shard states its place in the dataset in its own metadata (what
    # the readers compare the manifest with: a shard listed twice, left out,
    # reordered or taken from another directory is refused).
    dataset_id = uuid.uuid4().hex
    listed = []
    for k, path in enumerate(kept):
        with LMDBWriter(path, mode="a") as writer:
            writer._w.set_shard(dataset_id, k, len(kept))
        listed.append(shard_record(path))
    schema = _merge_schemas(listed, out_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "dataset_id": dataset_id,
        "num_samples": sum(r["num_samples"] for r in listed),
        "schema": schema,
        "codecs": _codecs(listed[0]["meta"], listed[0]["schema"]),
        "source": dict(source or {}),
        "created_with": {"torch_lmdb": torch_lmdb.__version__},
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shards": [dict({"path": r["path"], "num_samples": r["num_samples"], "meta_xxh3_64": r["meta_xxh3_64"]},
                        **_file_record(os.path.join(out_dir, r["path"])))
                   for r in listed],
    }
    _replace_manifest(out_dir, manifest)
    remove_temporaries(out_dir)
    return manifest


def _file_record(shard_path: str) -> Dict[str, Any]:
    """The whole-file part of a shard's manifest entry: size and xxh3-64 of data.mdb."""
    data = os.path.join(shard_path, "data.mdb")
    return {"size": os.path.getsize(data), "data_xxh3_64": _C.file_xxh3(data)}


def _replace_manifest(out_dir: str, manifest: Mapping[str, Any]) -> None:
    """Writes out_dir/manifest.json atomically: a temporary file, fsync, rename, fsync of the directory."""
    tmp = os.path.join(out_dir, f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out_dir, MANIFEST_NAME))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(out_dir)


def add_hashes(out_dir: str, progress: Optional[Any] = None) -> Dict[str, Any]:
    """``torch-lmdb manifest --hash DIR``: gives every shard of the manifest its
    ``size`` and ``data_xxh3_64`` (read from its data.mdb, after the manifest
    and every shard are checked), replacing manifest.json atomically. A
    shard's existing ``data_xxh3_64`` that differs from its file is an error
    (the file changed since the manifest was written): ManifestError naming it.
    ``progress`` is called with (shard index, shard count) after each shard."""
    manifest = read_manifest(out_dir)
    shards = manifest["shards"]
    for k, entry in enumerate(shards):
        record = _file_record(os.path.join(out_dir, entry["path"]))
        if "data_xxh3_64" in entry and entry["data_xxh3_64"] != record["data_xxh3_64"]:
            raise ManifestError(f"shard {k} ('{os.path.join(out_dir, entry['path'])}') has changed since its hash "
                                f"was recorded: data.mdb hashes to {record['data_xxh3_64']}, the manifest says "
                                f"{entry['data_xxh3_64']}")
        entry.update(record)
        if progress is not None:
            progress(k + 1, len(shards))
    _replace_manifest(out_dir, manifest)
    return manifest


def remove_temporaries(out_dir: str) -> None:
    """Removes shards left half-written by attempts that died (``.shard-*.tmp-*``)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return
    for n in names:
        if _TMP_RE.match(n):
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)


def prepare_output(out_dir: str, overwrite: bool) -> None:
    """Makes ``out_dir`` ready for a new set of shards. An existing manifest is
    refused unless ``overwrite`` (then it is removed first, so the directory
    reads as incomplete until the new manifest is written)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ManifestError(f"the output '{out_dir}' exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest):
        if not overwrite:
            raise ManifestError(f"'{out_dir}' already holds a sharded dataset ({MANIFEST_NAME}); "
                                f"remove it or pass overwrite=True (--overwrite)")
        os.remove(manifest)
        _fsync_dir(out_dir)
    if overwrite:
        for n in shard_like_entries(out_dir):
            if re.match(r"^shard-\d+\.lmdb$", n):
                shutil.rmtree(os.path.join(out_dir, n))
    remove_temporaries(out_dir)


def read_manifest(path: str) -> Dict[str, Any]:
    """Loads ``path/manifest.json`` after the C++ reader checked it and every
    shard it lists (its one implementation: csrc/torch_lmdb/reader.cpp,
    docs/FORMAT.md). Raises ManifestError naming the directory or the shard."""
    from torch_lmdb import Error

    try:
        _C.Reader([path]).take_warnings()
    except (Error, OSError) as e:  # NotFoundError is a FileNotFoundError too
        raise ManifestError(str(e)) from None
    if not is_manifest_dir(path):
        raise ManifestError(f"'{path}' is a torch_lmdb database, not a shard directory")
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)

"""Writing torch_lmdb shards with Dask.

:func:`write_shards` turns a Dask collection of samples (a ``dask.bag.Bag``
of sample dicts, or delayed objects each yielding sample dicts) into a shard
directory: every partition is written by one task as one shard database, and
the driver writes ``manifest.json`` once every task succeeded. A task that is
re-run (Dask retries it after its worker died) rewrites its shard from the
start under a temporary name, so no half-written shard is ever listed. On
failure no manifest is written, and the directory reads as incomplete.

:func:`convert_to_shards` does the same for a Zarr store, HDF5 file or
pickle-in-LMDB database (``torch-lmdb convert ... --shards N --dask``): each
task reads one chunk-aligned range of the source itself (the workers need the
source path, e.g. on a shared file system).
"""
import datetime
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch_lmdb import _manifest
from torch_lmdb._manifest import ManifestError

__all__ = ["write_shards", "convert_to_shards", "local_cluster", "aligned_ranges", "ShardWriteError"]


class ShardWriteError(RuntimeError):
    """A shard task failed (after Dask's retries); no manifest was written."""


def _write_partition(samples: Iterable[Mapping[str, Any]], out_dir: str, k: int, options: Dict[str, Any],
                     user: Dict[str, Any]) -> Dict[str, Any]:
    return _manifest.write_shard(out_dir, k, samples, user_metadata=user, **options)


def _convert_range(job: Dict[str, Any]) -> Dict[str, Any]:
    """One shard of a conversion: source rows [start, stop), read block by block."""
    import torch_lmdb
    from torch_lmdb import convert

    source = convert.open_source(job["kind"], job["source"], job["skip_mismatched"], job["allow_pickle"])
    start, stop, fields = job["start"], job["stop"], job["fields"]
    user = dict(source.provenance)
    user["source"] = {"format": source.format, "path": job["source_abs"], "start": start, "stop": stop,
                      "converted_at": job["converted_at"], "torch_lmdb_version": torch_lmdb.__version__}

    def samples():
        for position, end in convert._blocks(source, start, stop):
            columns = source.read(position, end, fields)
            for i in range(end - position):
                yield {name: columns[name][i] for name in fields}

    return _manifest.write_shard(job["out_dir"], job["k"], samples(), user_metadata=user, **job["options"])


def local_cluster(n_workers: int = 2, threads_per_worker: int = 1):
    """A ``distributed.LocalCluster`` of worker processes listening on the
    loopback interface only (their HTTP servers too, on free ports), without
    Dask's profiler: its scheduler runs in this process, and its profiler
    thread would outlive the cluster, sampling (and collecting garbage) every
    few milliseconds in a process that goes on to train."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                            host="127.0.0.1", dashboard_address="127.0.0.1:0",
                            worker_dashboard_address="127.0.0.1:0")


class _Client:
    """The client to run on: the given one, a client of ``scheduler`` (an
    address, or "local" for a new LocalCluster), or the current default client.
    What it opened it closes."""

    def __init__(self, client=None, scheduler: Optional[str] = None):
        from distributed import Client

        self.client, self._owned, self._cluster = client, False, None
        if client is not None:
            return
        if scheduler and scheduler != "local":
            self.client, self._owned = Client(scheduler), True
            return
        if scheduler is None:
            try:
                from distributed import default_client

                self.client = default_client()
                return
            except ValueError:
                pass
        self._cluster = local_cluster(n_workers=max(1, min(2, os.cpu_count() or 1)))
        self.client, self._owned = Client(self._cluster), True

    def __enter__(self):
        return self.client

    def __exit__(self, *exc) -> None:
        if self._owned:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def _run(tasks: List[Any], out_dir: str, client, retries: int) -> List[Dict[str, Any]]:
    """Computes the shard tasks on ``client`` with ``retries``; the error of
    the first failing task becomes a ShardWriteError naming the directory."""
    futures = client.compute(tasks, retries=retries)
    try:
        return client.gather(futures)
    except Exception as e:  # a task's own error, or KilledWorker after the retries
        client.cancel(futures)
        _manifest.remove_temporaries(out_dir)
        raise ShardWriteError(f"writing shards to '{out_dir}' failed: {type(e).__name__}: {e}; "
                              f"no manifest was written (the directory is an incomplete write)") from e


def _tasks_of(collection) -> List[Any]:
    """One delayed object per partition of a bag, or the delayed objects given."""
    import dask
    import dask.bag

    if isinstance(collection, dask.bag.Bag):
        return list(collection.to_delayed())
    if dask.is_dask_collection(collection) and hasattr(collection, "key") and not isinstance(collection, (list, tuple)):
        return [collection]  # one Delayed
    items = list(collection)
    if not items:
        raise ValueError("write_shards needs a dask.bag.Bag or a non-empty list of delayed objects")
    bad = [i for i, d in enumerate(items) if not dask.is_dask_collection(d)]
    if bad:
        raise TypeError(f"write_shards: item {bad[0]} of the list is a {type(items[bad[0]]).__name__}, "
                        f"not a Dask delayed object")
    return items


def write_shards(collection, out_dir: "os.PathLike | str", *, client=None, scheduler: Optional[str] = None,
                 retries: int = 3, map_size: Optional[int] = None, commit_every: Optional[int] = None,
                 source: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Writes a Dask collection of samples as a shard directory; returns the manifest.

    Args:
        collection: a ``dask.bag.Bag`` whose elements are sample dicts (one
            shard per partition), or a list of ``dask.delayed`` objects each
            computing an iterable of sample dicts (one shard each). Sample
            values are what :class:`torch_lmdb.LMDBWriter` takes.
        out_dir: the shard directory (created); open it with
            ``LMDBDataset(out_dir)``.
        client: a ``distributed.Client``; default: ``scheduler``'s, else the
            current default client, else a 2-worker loopback LocalCluster
            started and closed here.
        scheduler: a scheduler address ("tcp://host:8786") or "local".
        retries: Dask retries per task (a task whose worker died is re-run).
        map_size, commit_every: LMDBWriter options of every shard.
        source: provenance stored in the manifest (free JSON).
        overwrite: replace an existing shard directory.

    Raises:
        ShardWriteError: a task failed (the directory is left without manifest).
        ManifestError: shards with different fields, or nothing written.
    """
    import dask

    out_dir = os.fspath(out_dir)
    _manifest.prepare_output(out_dir, overwrite)
    parts = _tasks_of(collection)
    options = {"map_size": map_size, "commit_every": commit_every}
    user = {"source": dict(source or {})}
    tasks = [dask.delayed(_write_partition, pure=False)(p, out_dir, k, options, user) for k, p in enumerate(parts)]
    with _Client(client, scheduler) as dask_client:
        records = _run(tasks, out_dir, dask_client, retries)
    return _manifest.write_manifest(out_dir, records, source=dict(source or {}, kind="dask", partitions=len(parts)))


def _alignment(source) -> int:
    """Rows per chunk of the source (the largest chunk of its arrays), else 1."""
    arrays = getattr(source, "_arrays", None)
    if not arrays:
        return 1
    return max(1, max(source._chunk_rows(a) for a in arrays.values()))


def aligned_ranges(n: int, shards: int, align: int) -> List[Tuple[int, int]]:
    """``shards`` contiguous ranges covering [0, n) whose inner bounds are
    multiples of ``align`` (chunk-aligned: no chunk is read by two tasks);
    near-equal sizes. Fewer ranges when n has fewer chunks than ``shards``."""
    chunks = -(-n // align)
    shards = max(1, min(shards, chunks))
    bounds = [min(n, (chunks * k // shards) * align) for k in range(shards + 1)]
    bounds[-1] = n
    return [(bounds[k], bounds[k + 1]) for k in range(shards) if bounds[k + 1] > bounds[k]]


def convert_to_shards(kind: str, source_path: str, out_dir: str, *, shards: int, fields: Optional[Sequence[str]] = None,
                      limit: Optional[int] = None, scheduler: Optional[str] = None, client=None, retries: int = 3,
                      map_size: Optional[int] = None, commit_every: Optional[int] = None,
                      skip_mismatched: bool = False, allow_pickle: bool = False, verify: bool = False,
                      overwrite: bool = False, log=print, compression: str = "lz4",
                      columns: bool = True) -> Dict[str, Any]:
    """Converts a source to a shard directory with Dask: ``shards`` chunk-aligned
    tasks, each writing one shard; the manifest is written last. Returns it.
    ``compression``, ``columns``: as :func:`torch_lmdb.convert.convert`'s."""
    import dask

    from torch_lmdb import convert

    source = convert.open_source(kind, source_path, skip_mismatched, allow_pickle)
    names = list(source.fields)
    if fields:
        unknown = [f for f in fields if f not in source.fields]
        if unknown:
            raise convert.ConversionError(f"'{source_path}' has no field(s) {unknown}; available: {names}")
        names = list(fields)
    n = source.num_samples if limit is None else min(limit, source.num_samples)
    if shards < 1 or shards > max(1, n):
        raise convert.ConversionError(f"--shards must be between 1 and the sample count ({n}), got {shards}")
    if os.path.abspath(out_dir) == os.path.abspath(source_path):
        raise convert.ConversionError(f"the output '{out_dir}' is the source itself")
    _manifest.prepare_output(out_dir, overwrite)
    ranges = aligned_ranges(n, shards, _alignment(source))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    codecs = convert.source_compression(source, names, compression)
    for name in names:
        log(f"'{source_path}': field {name!r}: {codecs[name]}", file=sys.stderr)
    compressed = any(c not in (None, "none") for c in codecs.values())
    options = {"map_size": map_size, "commit_every": commit_every, "compression": codecs,
               "format_version": None if columns or not compressed else 4}
    jobs = [dict(kind=kind, source=source_path, source_abs=os.path.abspath(source_path),
                 skip_mismatched=skip_mismatched, allow_pickle=allow_pickle, start=a, stop=b, fields=names,
                 converted_at=stamp, out_dir=os.path.abspath(out_dir), k=k, options=options)
            for k, (a, b) in enumerate(ranges)]
    tasks = [dask.delayed(_convert_range, pure=False)(job) for job in jobs]
    t0 = time.perf_counter()
    with _Client(client, scheduler or "local") as dask_client:
        records = _run(tasks, out_dir, dask_client, retries)
    prov = dict(source.provenance)
    attrs = prov.pop("attrs", {})  # in full in every shard's user metadata; a digest here
    provenance = {"format": source.format, "path": os.path.abspath(source_path), "kind": kind,
                  "num_samples": n, "fields": names, "ranges": [list(r) for r in ranges],
                  "converted_at": stamp, "attrs_sha256": hashlib.sha256(
                      json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest(), **prov}
    if verify:
        paths = [os.path.join(out_dir, r["path"]) for r in records]
        problems = convert.verify_against_source(source, paths, ranges, names)
        if problems:
            raise convert.ConversionError("verification failed: " + "; ".join(problems[:10]))
    manifest = _manifest.write_manifest(out_dir, records, source=provenance)
    seconds = time.perf_counter() - t0
    log(f"converted {n} samples into {len(records)} shards in {seconds:.1f} s "
        f"({n / max(seconds, 1e-9):,.0f} samples/s)" + (", verified against the source" if verify else ""),
        file=sys.stderr)
    return manifest

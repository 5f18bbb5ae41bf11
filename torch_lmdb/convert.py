"""Conversion of Zarr stores, HDF5 files and pickle-in-LMDB databases to torch_lmdb.

:func:`open_source` opens a *source* (what one exposes: torch_lmdb._source);
:func:`convert` checks that the conversion fits, writes one or several shards
(in parallel processes), resumes an interrupted run and verifies the result
against the source.
"""
import datetime
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from torch_lmdb._hdf5_source import HDF5Source
from torch_lmdb._pickle_source import PickleLMDBSource
from torch_lmdb._source import (  # noqa: F401  (importable from here too)
    BLOCK_BYTES,
    MISMATCHED_METADATA_LIMIT,
    ConversionError,
    ConversionWarning,
    Interrupted,
)
from torch_lmdb._source_codecs import COMPRESSIONS, source_codec, source_compression  # noqa: F401
from torch_lmdb._splits import SPLIT_NAMES, _group_paths, find_splits, split_file_name  # noqa: F401
from torch_lmdb._zarr_source import ZarrSource

__all__ = ["open_source", "convert", "convert_splits", "find_splits", "split_file_name", "ConversionError",
           "ConversionWarning", "Interrupted"]

SOURCES = {"zarr": ZarrSource, "hdf5": HDF5Source, "pickle-lmdb": PickleLMDBSource}


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
        compressed = any(c not in (None, "none") for c in (job.get("compression") or {}).values())
        writer = torch_lmdb.LMDBWriter(out, map_size=job["map_size"], mode="a" if done else "w",
                                       user_metadata=user, commit_every=job["commit_every"],
                                       compression=job.get("compression"),
                                       format_version=None if job.get("columns", True) or not compressed else 4)
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
            allow_external: bool = False, allow_missing_chunks: bool = False, columns: bool = True) -> List[str]:
    """Converts one source (or one split ``group`` of it) to ``shards`` torch_lmdb databases;
    returns their paths. ``fields`` are relative to ``group``. ``allow_pickle``,
    ``allow_external``: see :func:`open_source`; ``allow_missing_chunks``: see
    :func:`_check_feasible`; ``compression``: see
    :func:`source_compression`; ``columns=False``: no columns (format version 4: every sample's
    small fields in its record, faster shuffled reads of compressed small fields, a larger file). A store with splits needs ``group`` (or :func:`convert_splits`)."""
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
                 compression=codecs, columns=columns)
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

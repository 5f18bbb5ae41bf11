"""The torch-lmdb command line (``python -m torch_lmdb``): convert, info, verify."""
import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_shard_dir(i: dict) -> None:
    print(f"{i['path']}  (shard directory, {len(i['shards'])} shards)")
    print(f"  samples:        {i['num_samples']}")
    print(f"  file size:      {_human(i['file_size'])}")
    print("  fields:")
    for f in i["fields"]:
        print(f"    {f['name']:24} {f['kind']:6} {f['dtype']:10} {f['shape']}  {_codec_text(f)}")
        if f.get("codecs"):
            print(f"    {'':24} per shard: {', '.join(f['codecs'])}")
    source = i["manifest"].get("source") or {}
    if source:
        print(f"  source:         {json.dumps(source)[:2000]}")
    print("  shards:")
    for s in i["shards"]:
        print(f"    {s['path']:24} {s['num_samples']:>10} samples  {_human(s['file_size'])}")


def _codec_text(field) -> str:
    """'lz4:5  stored 1.2 MiB of 4.0 MiB raw (0.30x)' for `info`."""
    codec = field.get("codec", "none")
    if field.get("level") is not None and codec != "none":
        codec = f"{codec}:{field['level']}"
    stored, raw = field.get("stored_bytes"), field.get("raw_bytes")
    if stored is None or raw is None:
        return f"{codec:7} stored/raw bytes not recorded"
    ratio = f"{stored / raw:.2f}x" if raw else "-"
    return f"{codec:7} stored {_human(stored)} of {_human(raw)} raw ({ratio})"


def _is_url(path: str) -> bool:
    from torch_lmdb import _C

    return _C.is_url(path)


def _error_line(command: str, error: BaseException) -> str:
    """The one form of a command's error: ``torch-lmdb CMD: error: Class: message``."""
    return f"torch-lmdb {command}: error: {type(error).__name__}: {error}"


def _staged(args, path: str) -> str:
    """A URL (or, with --cache-dir, a shard directory elsewhere) staged whole to
    the cache: the local mirror's path. Other paths stay."""
    from torch_lmdb import _C
    from torch_lmdb.remote import default_cache_dir, parse_cache_limit

    if not (_C.is_url(path) or args.cache_dir):
        return path
    cache = _C.ShardCache(path, args.cache_dir or default_cache_dir(), parse_cache_limit(args.cache_limit) or 0)
    cache.acquire_all()
    _HELD.append(cache)  # its leases last as long as the command
    return cache.local_dir


_HELD: list = []


def _cmd_manifest(args) -> int:
    from torch_lmdb import _manifest

    def progress(k: int, n: int) -> None:
        if args.progress:
            print(f"\r{args.path}: hashed {k}/{n} shards", end="" if k < n else "\n", file=sys.stderr, flush=True)

    manifest = _manifest.add_hashes(args.path, progress)
    total = sum(s["size"] for s in manifest["shards"])
    print(f"{args.path}: size and data_xxh3_64 recorded for {len(manifest['shards'])} shards ({_human(total)})")
    return 0


def _cmd_info(args) -> int:
    import torch_lmdb

    infos = []
    for p in args.paths:
        i = torch_lmdb.info(_staged(args, p))
        if i.get("path") != p and (_is_url(p) or args.cache_dir):
            i["cached_at"], i["path"] = i.get("path"), p
        infos.append(i)
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=1))
        return 0
    for i in infos:
        if "shards" in i:
            _print_shard_dir(i)
            _print_selections(i)
            continue
        print(f"{i['path']}")
        print(f"  samples:        {i['num_samples']}")
        print("  state:          " + ("complete (the writer closed cleanly)" if i["complete"] else
                                      "INCOMPLETE (the writer did not close cleanly; convert --resume continues "
                                      "a conversion)"))
        print(f"  format version: {i['format_version']}"
              + (f" ({i['samples_per_value']} samples per LMDB value)" if i.get("samples_per_value", 1) > 1 else "")
              + (", compact records (fields by schema position)" if i["format_version"] >= 4 else "")
              + (", small fields in columns" if i["format_version"] == 5 else ""))
        print(f"  file size:      {_human(i['file_size'])}   map size: {_human(i['map_size'])}")
        print("  fields:")
        for f in i["fields"]:
            print(f"    {f['name']:24} {f['kind']:6} {f['dtype']:10} {str(f['shape']):16} {_codec_text(f)}")
        user = i["metadata"].get("user") or {}
        if user:
            print(f"  user metadata:  {json.dumps(user)[:2000]}")
        _print_selections(i)
    return 0


def _print_selections(i: dict) -> None:
    """The selections stored beside a database, with their sizes (or why they no longer open)."""
    import torch_lmdb

    if not i.get("selections"):
        return
    parts = []
    for name in i["selections"]:
        try:
            parts.append(f"{name} ({len(torch_lmdb.LMDBDataset(i['path'], selection=name))} samples)")
        except torch_lmdb.Error as e:
            parts.append(f"{name} (unusable: {type(e).__name__})")
    print(f"  selections:     {', '.join(parts)}")


def _read_ids(file: str, n: int) -> List[int]:
    """Sample indices of an id list: one integer a line; blank lines and '#' comments are skipped."""
    out = []
    with open(file) as f:
        for line_no, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                index = int(text)
            except ValueError:
                raise ValueError(f"{file}:{line_no}: expected a sample index, got {text!r}") from None
            if not 0 <= index < n:
                raise IndexError(f"{file}:{line_no}: index {index} out of range for dataset of size {n}")
            out.append(index)
    return out


def _cmd_select(args) -> int:
    import torch
    import torch_lmdb
    from torch_lmdb import selection

    ds = torch_lmdb.LMDBDataset(args.path)
    ids = _read_ids(args.include_file or args.exclude_file, len(ds))
    if args.include_file:
        keep = sorted(set(ids))
    else:
        mask = torch.ones(len(ds), dtype=torch.bool)
        mask[torch.tensor(ids, dtype=torch.int64)] = False
        keep = mask.nonzero().squeeze(1)
    file = selection.save_named(ds, args.name, torch.as_tensor(keep, dtype=torch.int64))
    print(f"{file}: {len(keep)} of {len(ds)} samples")
    return 0


def _cmd_verify(args) -> int:
    from torch_lmdb import _C, _verify
    from torch_lmdb._info import missing_database

    status = 0
    paths: List[str] = []
    for given in args.paths:
        path = given
        try:
            path = _staged(args, given)
            if path != given:
                print(f"{given}: every shard fetched and its size and xxh3 checked against the manifest "
                      f"(cached at {path})")
            shards = _verify.shard_paths(path)
        except Exception as e:  # noqa: BLE001 - one line naming the directory or shard
            print(f"{path}: damaged or incomplete: {e}")
            status = 1
            continue
        if shards is None:
            paths.append(path)
        else:
            print(f"{path}: manifest ok, {len(shards)} shards")
            paths.extend(shards)
    for path in paths:
        if not os.path.isfile(os.path.join(path, "data.mdb")):  # an error as info's, not a damage report
            error = missing_database(path, "no data.mdb") if os.path.exists(path) else missing_database(path)
            print(_error_line(args.command, error), file=sys.stderr)
            status = 1
            continue
        reason = _C.meta_pages_problem(path)  # one parser: the C++ check at open
        if reason is not None:
            print(f"{path}: damaged: {reason}")
            status = 1
            continue
        res = _verify.verify_in_child(path, args.max_errors, args.progress)
        if "signal" in res:
            where = f" while reading index {res['at']}" if res.get("at") is not None else " while opening it"
            print(f"{path}: damaged: reading it crashed the checking process ({res['signal']}){where}; "
                  f"the file is damaged or truncated")
            status = 1
            continue
        if "error" in res:
            print(f"{path}: damaged or unreadable: {res['error']}")
            status = 1
            continue
        bad = list(res["bad"])
        if not res["complete"]:
            bad.append("database is marked incomplete (its writer did not close cleanly)")
        if bad:
            status = 1
            print(f"{path}: {len(bad)} problem(s), first: {bad[0]}")
            for b in bad[1:]:
                print(f"  {b}")
        else:
            print(f"{path}: ok, {res['n']} samples, every checksum verified")
    return status


def _size(text: str) -> int:
    """'1073741824', '512M', '10G' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 512M, 10G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _cmd_convert(args) -> int:
    from torch_lmdb import convert

    kinds = [(k, p) for k, p in (("zarr", args.zarr_path), ("hdf5", args.hdf5_path),
                                 ("pickle-lmdb", args.pickle_lmdb_path)) if p]
    if len(kinds) != 1:
        raise ValueError("give exactly one source: --zarr-path, --hdf5-path or --pickle-lmdb-path")
    kind, source = kinds[0]
    if args.dask is not None:
        return _cmd_convert_dask(args, kind, source)
    fields = [f for f in args.fields.split(",") if f] if args.fields else None
    options = dict(fields=fields, limit=args.limit, shards=args.shards, map_size=args.map_size, resume=args.resume,
                   verify=args.verify, skip_mismatched=args.skip_mismatched, progress=args.progress,
                   commit_every=args.commit_every, allow_pickle=args.allow_pickle,
                   compression=args.compression, allow_external=args.allow_external,
                   allow_missing_chunks=args.allow_missing_chunks, columns=not args.no_columns)
    splits, _ = convert.store_splits(kind, source, args.allow_pickle, args.allow_external)
    groups = args.group or []
    try:
        if args.output and len(groups) == 1:  # one group to a named database
            paths = convert.convert(kind, source, args.output, group=groups[0], **options)
        elif args.output and (splits or groups):
            what = f"groups {', '.join(groups)}" if groups else f"splits {', '.join(splits)}"
            raise convert.ConversionError(
                f"'{source}' holds {what}, one database each: pass --output-dir DIR (writes "
                f"{', '.join('DIR/' + convert.split_file_name(g) for g in (groups or splits))}), "
                f"or --group NAME with --output PATH for one of them")
        elif splits or groups:
            done = convert.convert_splits(kind, source, args.output_dir or ".", groups=groups or None, **options)
            paths = [p for ps in done.values() for p in ps]
        else:
            if args.output:
                output = args.output
            else:
                stem = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
                output = os.path.join(args.output_dir or ".", stem + ".lmdb")
            paths = convert.convert(kind, source, output, **options)
    except convert.Interrupted as e:
        print(f"torch-lmdb convert: interrupted ({e}); the output is marked incomplete; "
              f"run the same command with --resume to continue", file=sys.stderr)
        return 130
    for p in paths:
        print(p)
    return 0


def _cmd_convert_dask(args, kind: str, source: str) -> int:
    """convert --dask: a shard directory (manifest.json + shard-<k>.lmdb) at
    --output, else at <--output-dir or .>/<source name>."""
    from torch_lmdb import dask as tl_dask

    if args.resume:
        raise ValueError("--resume is not used with --dask: a failed task is retried by Dask, and a rerun "
                         "rewrites every shard")
    stem = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    out_dir = args.output or os.path.join(args.output_dir or ".", stem)
    fields = [f for f in args.fields.split(",") if f] if args.fields else None
    scheduler = None if args.dask == "local" else args.dask
    tl_dask.convert_to_shards(kind, source, out_dir, shards=args.shards, fields=fields, limit=args.limit,
                              scheduler=scheduler, map_size=args.map_size, commit_every=args.commit_every,
                              skip_mismatched=args.skip_mismatched, allow_pickle=args.allow_pickle,
                              verify=args.verify, overwrite=args.overwrite, compression=args.compression,
                              columns=not args.no_columns)
    print(out_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from torch_lmdb.convert import COMPRESSIONS

    parser = argparse.ArgumentParser(prog="torch-lmdb", description="Convert, inspect and verify torch_lmdb databases.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "convert", help="convert a Zarr store, an HDF5 file or a pickle-in-LMDB database",
        description="Convert a dataset to torch_lmdb. Every array whose first dimension is the sample count "
                    "becomes a field named by its path (group/array); attributes are kept as user metadata. "
                    "A store whose top-level groups are splits (train/, val/, ... each with the same arrays) "
                    "becomes one database per split: DIR/train.lmdb, DIR/val.lmdb (--output-dir DIR).",
        epilog="Nothing is unpickled without --allow-pickle: unpickling executes code from the file, so a "
               "pickle-in-LMDB database, or a Zarr array using the Pickle codec, is refused unless you pass "
               "--allow-pickle for a source you trust. Reading other files (HDF5 external storage, links, virtual "
               "datasets) needs --allow-external, mostly missing chunks --allow-missing-chunks (see SECURITY.md). "
               "Interrupted conversions leave the output marked incomplete; rerun with --resume.")
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--zarr-path", metavar="PATH", help="a Zarr store of format 2 or 3 (a directory; with zarr-python 2 also a .zip or a URL)")
    src.add_argument("--hdf5-path", metavar="PATH", help="an HDF5 file")
    src.add_argument("--pickle-lmdb-path", metavar="PATH",
                     help="a py-lmdb database of pickled dicts (needs --allow-pickle: unpickling executes code "
                          "from the file)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow unpickling: --pickle-lmdb-path, and Zarr arrays using the Pickle codec; "
                        "only for sources you trust")
    p.add_argument("--allow-external", action="store_true",
                   help="allow an HDF5 source to read other files: external storage, external links and "
                        "virtual datasets whose data lies outside it; only for sources you trust")
    p.add_argument("--output-dir", metavar="DIR",
                   help="write DIR/<source name>.lmdb, or DIR/<split>.lmdb per split of a store with splits "
                        "(a nested group a/b becomes a__b.lmdb) (default: the current directory)")
    p.add_argument("--output", metavar="PATH",
                   help="the output database path (overrides --output-dir); with splits, only with one --group")
    p.add_argument("--group", action="append", metavar="NAME",
                   help="convert only this split group (repeatable; any group path holding arrays, e.g. train "
                        "or 2024/train); fields are named relative to it")
    p.add_argument("--fields", metavar="A,B",
                   help="convert only these fields (comma-separated; relative to the split group)")
    p.add_argument("--limit", type=_positive, metavar="N", help="convert only the first N samples")
    p.add_argument("--shards", type=_positive, default=1, metavar="K",
                   help="write K databases of near-equal size, in parallel processes")
    p.add_argument("--dask", nargs="?", const="local", default=None, metavar="SCHEDULER",
                   help="run the --shards K tasks on a dask.distributed cluster: a local one (worker processes "
                        "on 127.0.0.1) without SCHEDULER, else the scheduler at that address (e.g. "
                        "tcp://host:8786; the workers must see the source path). Writes a shard directory: "
                        "--output DIR (default <output-dir>/<source name>) with shard-<k>.lmdb and "
                        "manifest.json (written last)")
    p.add_argument("--overwrite", action="store_true", help="with --dask: replace an existing shard directory")
    p.add_argument("--map-size", type=_size, metavar="BYTES", help="initial map size (e.g. 10G); the map grows anyway")
    p.add_argument("--commit-every", type=_positive, metavar="N", help="commit every N samples (default 4096)")
    p.add_argument("--skip-mismatched", action="store_true",
                   help="leave out arrays whose first dimension is not the sample count, printing a warning "
                        "line for each (default: keep small ones in the metadata, refuse large ones)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="lz4",
                   help="Blosc codec of the tensor fields (default lz4, the fastest to read; source: each "
                        "array's own compressor's nearest, none for an uncompressed array); each field's "
                        "codec is printed on stderr")
    p.add_argument("--no-columns", action="store_true",
                   help="keep every sample's small fields in its own record (format version 4): faster "
                        "shuffled reads of compressed fields under 128 bytes, a slightly larger file")
    p.add_argument("--allow-missing-chunks", action="store_true",
                   help="convert an array even when more than half of the chunks its samples need are missing "
                        "(written as fill values); refused by default")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion into the same output")
    p.add_argument("--verify", action="store_true", help="read back every sample and compare it with the source")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="show a progress bar with samples/s (default: on a terminal)")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("info", help="describe databases: samples, fields, sizes, metadata")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    _cache_args(p)
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("manifest", help="record each shard's file size and hash in a shard directory's manifest",
                       description="With --hash: adds 'size' and 'data_xxh3_64' (xxh3-64 of data.mdb) to every "
                                   "shard of DIR/manifest.json, after checking the manifest and every shard, so the "
                                   "directory can be staged from an HTTP server, S3 or a shared file system (README "
                                   "\"Remote and shared storage\"). Shard directories written by torch_lmdb get them "
                                   "when written.")
    p.add_argument("path", metavar="DIR")
    p.add_argument("--hash", action="store_true", required=True, help="record each shard's size and xxh3-64")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="show progress (default: on a terminal)")
    p.set_defaults(func=_cmd_manifest)
    p = sub.add_parser("select", help="store a named selection of a database from a list of sample indices",
                       description="Stores PATH/selections/NAME.sel (LMDBDataset(PATH, selection=NAME) opens it): "
                                   "the samples listed in --include-file, or all but those in --exclude-file "
                                   "(one sample index a line; '#' comments).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--name", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--include-file", metavar="FILE")
    which.add_argument("--exclude-file", metavar="FILE")
    p.set_defaults(func=_cmd_select)
    p = sub.add_parser("verify", help="decode every record and check every checksum",
                       description="Checks the file size against LMDB's meta pages, then decodes every record "
                                   "and checks every checksum in a child process, so a damaged file that makes "
                                   "LMDB fault is reported (exit 1, one line naming the path) instead of "
                                   "killing the command.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--max-errors", type=int, default=20, help="report at most this many bad records (default 20)")
    _cache_args(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="show a progress bar (default: on a terminal)")
    p.set_defaults(func=_cmd_verify)
    return parser


def _cache_args(p) -> None:
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where a PATH that is a URL (http://, https://, s3://) is staged (default: "
                        "$TORCH_LMDB_CACHE, else ~/.cache/torch_lmdb); given, a local shard directory is staged too")
    p.add_argument("--cache-limit", metavar="SIZE", default=None,
                   help="bytes the cache may hold, e.g. 20GB (default: no limit)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, ``warning: <message>``, without Python source lines."""
    text = " ".join(str(message).split())
    try:
        print(f"warning: {text}", file=file or sys.stderr)
    except OSError:  # stderr closed: nothing to report to
        pass


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except Exception as e:  # one line, no traceback, unless --debug
            if args.debug:
                raise
            print(_error_line(args.command, e), file=sys.stderr)
            return 1

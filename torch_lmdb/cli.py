"""The torch-lmdb command line (``python -m torch_lmdb``): info and verify.

Conversion from Zarr, HDF5 and pickle-in-LMDB is not implemented yet.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cmd_info(args) -> int:
    import torch_lmdb

    infos = [torch_lmdb.info(p) for p in args.paths]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=1))
        return 0
    for i in infos:
        print(f"{i['path']}")
        print(f"  samples:        {i['num_samples']}{'' if i['complete'] else '  (INCOMPLETE: the writer did not close cleanly)'}")
        print(f"  format version: {i['format_version']}")
        print(f"  file size:      {_human(i['file_size'])}   map size: {_human(i['map_size'])}")
        print("  fields:")
        for f in i["fields"]:
            print(f"    {f['name']:24} {f['kind']:6} {f['dtype']:10} {f['shape']}")
        user = i["metadata"].get("user") or {}
        if user:
            print(f"  user metadata:  {json.dumps(user)[:2000]}")
    return 0


def _cmd_verify(args) -> int:
    import torch_lmdb
    from torch_lmdb import _C

    status = 0
    for path in args.paths:
        reader = _C.Reader([path], verify=True)
        for message in reader.take_warnings():
            print(f"warning: {message}", file=sys.stderr)
        meta = json.loads(reader.metadata_json(0))
        n = len(reader)
        bad: List[str] = []
        progress = None
        if args.progress:
            from tqdm import tqdm

            progress = tqdm(total=n, unit="sample", desc=f"verifying {os.path.basename(path)}", file=sys.stderr)
        for i in range(n):
            try:
                reader.get(i)
            except torch_lmdb.Error as e:
                bad.append(f"index {i}: {e}")
                if len(bad) >= args.max_errors:
                    break
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        if not meta.get("complete", False):
            bad.append("database is marked incomplete (its writer did not close cleanly)")
        if bad:
            status = 1
            print(f"{path}: {len(bad)} problem(s) (showing up to {args.max_errors}):")
            for b in bad:
                print(f"  {b}")
        else:
            print(f"{path}: ok, {n} samples, every checksum verified")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-lmdb", description="Inspect and verify torch_lmdb databases.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="describe databases: samples, fields, sizes, metadata")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("verify", help="decode every record and check every checksum")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--max-errors", type=int, default=20, help="report at most this many bad records (default 20)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="show a progress bar (default: on a terminal)")
    p.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        print(f"torch-lmdb {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

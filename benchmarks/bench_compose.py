"""Mixtures and selections: its bars, every ratio measured in this run.

    /usr/bin/python3 benchmarks/bench_compose.py [--quick] [--medium 100000] [--tiny 10000000] [--rows selection,...] [--json out.json]

Rows:
- resume: a Mixture of 3 sources (real databases, epoch of 2e8 positions),
  make_loader's time from load_state_dict at global position 1e8 to the first
  batch, vs a fresh epoch's first batch (random and stratified); the best of
  REPEATS runs, each with a new Mixture (nothing cached).
- selection: shuffled get_batch (batch 256) over a 10 % selection of a
  medium-profile database (16 KiB float32 samples) vs the full database,
  interleaved, best of REPEATS; warm page cache.
- filter: building and storing a named selection from one scalar field of
  `--tiny` tiny samples (ds.filter(..., name=...)), seconds and samples/s.
- mixture loader: make_loader(num_workers=2) over a Mixture of the medium
  database split in 3 databases vs make_loader(num_workers=2) over the one
  database (same samples, shuffled, batch 256), interleaved, best of REPEATS.
"""
import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch_lmdb  # noqa: E402

REPEATS = 3
BATCH = 256


def write(path, n, make, first=0):
    with torch_lmdb.LMDBWriter(path) as w:
        w.write_many(make(i) for i in range(first, first + n))


def medium(rng):
    block = rng.standard_normal(4096 * 64).astype(np.float32)
    return lambda i: {"x": block[(i % 63) * 4096:(i % 63) * 4096 + 4096], "y": np.int64(i)}


def tiny(i):
    return {"id": np.int64(i), "label": np.int32(i % 10), "weight": np.float32(1.0), "v": np.zeros(16, np.float32)}


def first_batch_seconds(mixture, position):
    loader = torch_lmdb.make_loader(mixture, BATCH, shuffle=True, seed=1)
    if position:
        loader.load_state_dict({"seed": 1, "epoch": 0, "position": position, "num_samples": len(mixture),
                                "order": "shuffle"})
    t = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t


def bench_resume(paths, log):
    rows = []
    for stratified in (False, True):
        fresh, resumed = [], []
        for _ in range(REPEATS):
            for position, out in ((0, fresh), (10**8, resumed)):
                m = torch_lmdb.Mixture(paths, [0.5, 0.3, 0.2], epoch_size=2 * 10**8, stratified=stratified)
                out.append(first_batch_seconds(m, position))
        row = dict(row="resume at 1e8 (3 sources)", mode="stratified" if stratified else "random",
                   fresh_ms=min(fresh) * 1e3, resumed_ms=min(resumed) * 1e3, ratio=min(resumed) / min(fresh),
                   bar="<= 2x and < 50 ms")
        log(f"  resume {row['mode']}: fresh {row['fresh_ms']:.2f} ms, at 1e8 {row['resumed_ms']:.2f} ms")
        rows.append(row)
    return rows


def get_batch_rate(ds, batches, seed):
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    for _ in range(batches):
        ds.get_batch(torch.randint(len(ds), (BATCH,), generator=g).tolist())
    return batches * BATCH / (time.perf_counter() - t)


def bench_selection(path, log, batches, n):
    full = torch_lmdb.LMDBDataset(path)
    view = full.select(torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:len(full) // 10])
    for ds in (full, view):  # warm: every page of the file once
        for batch in ds.iter_batches(4096):
            pass
    rates = {"full": [], "selection": []}
    for r in range(REPEATS):
        rates["full"].append(get_batch_rate(full, batches, r))
        rates["selection"].append(get_batch_rate(view, batches, r))
    row = dict(row=f"10 % selection of {n} medium samples, shuffled get_batch", full=max(rates["full"]),
               selection=max(rates["selection"]), ratio=max(rates["selection"]) / max(rates["full"]), bar=">= 0.95x")
    log(f"  selection: full {row['full']:.0f}/s, 10 % selection {row['selection']:.0f}/s")
    return [row]


def bench_filter(tmp, n, log):
    path = os.path.join(tmp, "tiny")
    t = time.perf_counter()
    write(path, n, tiny)
    log(f"  wrote {n} tiny samples in {time.perf_counter() - t:.1f} s")
    ds = torch_lmdb.LMDBDataset(path)
    t = time.perf_counter()
    view = ds.filter(lambda b: b["label"] != 3, fields=["label"], name="no-3")
    seconds = time.perf_counter() - t
    assert len(view) == n - (n + 6) // 10
    log(f"  filter: {seconds:.2f} s")
    shutil.rmtree(path)
    return [dict(row=f"named selection from one scalar field of {n} tiny samples", seconds=seconds,
                 samples_per_s=n / seconds)]


def loader_rate(ds, batches):
    loader = torch_lmdb.make_loader(ds, BATCH, shuffle=True, seed=3, num_workers=2,
                                    multiprocessing_context="fork")
    it = iter(loader)
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - t)
    it.close()  # the DataLoader iterator goes, its workers end before the next loader forks
    del it, loader
    gc.collect()
    return rate


def bench_mixture_loader(full_path, parts, log, batches):
    full = torch_lmdb.LMDBDataset(full_path)
    m = torch_lmdb.Mixture(dict(zip(("a", "b", "c"), parts)), [0.5, 0.3, 0.2], epoch_size=len(full))
    rates = {"one": [], "mixture": []}
    for _ in range(REPEATS):
        rates["one"].append(loader_rate(full, batches))
        rates["mixture"].append(loader_rate(m, batches))
    row = dict(row="make_loader(num_workers=2): Mixture of 3 vs one database", one=max(rates["one"]),
               mixture=max(rates["mixture"]), ratio=max(rates["mixture"]) / max(rates["one"]), bar=">= 0.9x")
    log(f"  loader: one database {row['one']:.0f}/s, mixture {row['mixture']:.0f}/s")
    return [row]


ROWS = ("resume", "selection", "mixture", "filter")


def run(quick=False, n_medium=100_000, n_tiny=10_000_000, log=None, work_dir=None, rows=ROWS):
    """The `rows` of this benchmark (all by default; benchmarks/run.py calls it too)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    n_medium = 20_000 if quick else n_medium
    n_tiny = 1_000_000 if quick else n_tiny
    batches = 50 if quick else 200
    tmp = tempfile.mkdtemp(dir=work_dir)
    try:
        rng = np.random.default_rng(0)
        make = medium(rng)
        full = os.path.join(tmp, "medium")
        t = time.perf_counter()
        if "selection" in rows or "mixture" in rows:
            write(full, n_medium, make)
        parts = []
        if "resume" in rows or "mixture" in rows:
            third = n_medium // 3
            for k in range(3):
                parts.append(os.path.join(tmp, f"part{k}"))
                write(parts[-1], third if k < 2 else n_medium - 2 * third, make, first=k * third)
        log(f"  wrote the medium samples ({n_medium}) in {time.perf_counter() - t:.1f} s")
        out = []
        if "resume" in rows:
            out += bench_resume(dict(zip(("a", "b", "c"), parts)), log)
        if "selection" in rows:
            out += bench_selection(full, log, batches, n_medium)
        if "mixture" in rows:
            out += bench_mixture_loader(full, parts, log, batches)
        if "filter" in rows:
            out += bench_filter(tmp, n_tiny, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def table(rows):
    """The rows as markdown lines."""
    lines = ["| row | figures | ratio | bar |", "|---|---|---|---|"]
    for r in rows:
        if "fresh_ms" in r:
            figs = f"{r['mode']}: fresh {r['fresh_ms']:.2f} ms, resumed {r['resumed_ms']:.2f} ms"
        elif "selection" in r:
            figs = f"full {r['full']:,.0f} samples/s, selection {r['selection']:,.0f} samples/s"
        elif "mixture" in r:
            figs = f"one database {r['one']:,.0f} samples/s, mixture {r['mixture']:,.0f} samples/s"
        else:
            figs = f"{r['seconds']:.2f} s, {r['samples_per_s']:,.0f} samples/s"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        lines.append(f"| {r['row']} | {figs} | {ratio} | {r.get('bar', '')} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--medium", type=int, default=100_000, help="medium-profile samples (16 KiB each)")
    ap.add_argument("--tiny", type=int, default=10_000_000, help="tiny samples for the filter row")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    args = ap.parse_args()
    asked = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(asked) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    rows = run(args.quick, args.medium, args.tiny, work_dir=args.dir, rows=asked)
    print("\n".join(table(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

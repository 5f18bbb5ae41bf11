"""Quick read benchmark, 16 KiB float32 samples, shuffled, batch 64.

Compares torch_lmdb (ds[i] through DataLoader, get_batch in process, the
batched loader) with a py-lmdb + pickle Dataset (the design torch_lmdb
replaces), all measured in this run. Prints one table; --json writes it.

    /usr/bin/python3 benchmarks/read_quick.py [--samples 20000] [--json out.json]
"""
import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time

import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_lmdb  # noqa: E402


class PickleLMDB(torch.utils.data.Dataset):
    """The common py-lmdb + pickle dataset (lazy open per process)."""

    def __init__(self, path):
        self.path, self.env = path, None
        with lmdb.open(path, readonly=True, lock=False) as env:
            self.n = env.stat()["entries"]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.env is None:
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False)
        with self.env.begin() as txn:
            d = pickle.loads(txn.get(i.to_bytes(8, "big")))
        return {k: torch.as_tensor(v) for k, v in d.items()}

    def __getstate__(self):
        return {**self.__dict__, "env": None}


def rate(fn, n_samples, repeat=3):
    fn()  # warm-up: first-touch and first-mapping costs
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_samples / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="tlmdb-bench-")
    try:
        n, B = args.samples, args.batch
        rng = np.random.default_rng(0)
        data = [rng.standard_normal(4096, dtype=np.float32) for _ in range(256)]
        tl_path, pk_path = os.path.join(tmp, "tl"), os.path.join(tmp, "pk")
        with torch_lmdb.LMDBWriter(tl_path) as w:
            for i in range(n):
                w.write({"x": data[i % 256], "y": i})
        env = lmdb.open(pk_path, map_size=4 << 30)
        with env.begin(write=True) as txn:
            for i in range(n):
                txn.put(i.to_bytes(8, "big"), pickle.dumps({"x": data[i % 256], "y": np.int64(i)}))
        env.close()
        ds, pk = torch_lmdb.LMDBDataset(tl_path), PickleLMDB(pk_path)
        perm = torch.randperm(n).tolist()
        batches = [perm[i:i + B] for i in range(0, n, B)]

        def loop(loader):
            return lambda: [None for _ in loader]

        rows = []
        for name, dataset in (("torch_lmdb ds[i]", ds), ("py-lmdb + pickle", pk)):
            for nw in (0, 2):
                loader = DataLoader(dataset, batch_size=B, shuffle=True, num_workers=nw, persistent_workers=nw > 0)
                rows.append((f"{name}, DataLoader num_workers={nw}", rate(loop(loader), n)))
        rows.append(("torch_lmdb get_batch in process", rate(lambda: [ds.get_batch(b) for b in batches], n)))
        for nw in (0, 2):
            loader = torch_lmdb.make_loader(ds, B, shuffle=True, num_workers=nw, persistent_workers=nw > 0)
            rows.append((f"torch_lmdb make_loader (batched), num_workers={nw}", rate(loop(loader), n)))
        base = dict(rows)["py-lmdb + pickle, DataLoader num_workers=0"]
        print(f"{n} samples of 16 KiB, shuffled, batch {B}, torch {torch.__version__}")
        print(f"| {'path':58} | samples/s | MB/s | vs py-lmdb+pickle nw=0 |")
        print(f"|{'-' * 60}|-----------|------|------------------------|")
        for name, r in rows:
            print(f"| {name:58} | {r:9.0f} | {r * 16384 / 1e6:4.0f} | {r / base:22.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"samples": n, "batch": B, "rows": dict(rows)}, f, indent=1)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

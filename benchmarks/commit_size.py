"""Writer throughput against commit_every (16 KiB samples), to choose the default.

    /usr/bin/python3 benchmarks/commit_size.py [--samples 20000] [--repeat 3]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_lmdb  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--samples", type=int, default=20000)
ap.add_argument("--repeat", type=int, default=3)
args = ap.parse_args()
x = np.random.default_rng(0).standard_normal(4096, dtype=np.float32)
for ce in (16, 64, 256, 1024, 4096):
    rates = []
    for _ in range(args.repeat):
        d = tempfile.mkdtemp()
        t = time.perf_counter()
        with torch_lmdb.LMDBWriter(os.path.join(d, "w"), commit_every=ce) as w:
            for i in range(args.samples):
                w.write({"x": x, "y": i})
        rates.append(args.samples / (time.perf_counter() - t))
        shutil.rmtree(d)
    print(f"commit_every={ce:5d}: median {sorted(rates)[len(rates) // 2]:8.0f} samples/s "
          f"(min {min(rates):.0f}, max {max(rates):.0f})")

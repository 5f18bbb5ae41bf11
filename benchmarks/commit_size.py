"""Writer throughput against the commit interval (16 KiB samples), to choose the defaults.

    /usr/bin/python3 benchmarks/commit_size.py [--sweep bytes|every] [--samples 20000] [--repeat 4] [--dir /tmp]

Each setting is written `--repeat` times, interleaved with the others; the
table shows the best run (the least disturbed by the rest of the machine) and
every run.
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

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--sweep", choices=("bytes", "every"), default="bytes",
                help="vary commit_bytes (MiB) or commit_every (samples)")
ap.add_argument("--samples", type=int, default=20000)
ap.add_argument("--repeat", type=int, default=4)
ap.add_argument("--dir", default=None, help="where the databases go (default: the system temp dir)")
args = ap.parse_args()

rng = np.random.default_rng(0)
samples = [{"x": rng.standard_normal(4096, dtype=np.float32), "y": i} for i in range(args.samples)]
settings = (4, 8, 16, 32, 64) if args.sweep == "bytes" else (64, 256, 1024, 4096, 16384)
times = {s: [] for s in settings}
for _ in range(args.repeat):
    for s in settings:
        options = dict(commit_bytes=s << 20, commit_every=1 << 30) if args.sweep == "bytes" else \
            dict(commit_every=s, commit_bytes=1 << 40)
        d = tempfile.mkdtemp(dir=args.dir)
        t = time.perf_counter()
        with torch_lmdb.LMDBWriter(os.path.join(d, "w"), **options) as w:
            w.write_many(samples)
        times[s].append((time.perf_counter() - t) / args.samples * 1e6)
        shutil.rmtree(d)
unit = "MiB" if args.sweep == "bytes" else "samples"
for s, ts in times.items():
    print(f"commit_{args.sweep}={s:6d} {unit}: best {min(ts):6.1f} us/sample "
          f"({1e6 / min(ts):,.0f} samples/s); "
          f"all {', '.join(f'{t:.1f}' for t in ts)}")

"""The benchmark suite: torch_lmdb side by side with what a user would pick instead.

    /usr/bin/python3 benchmarks/run.py --quick      # under 5 minutes on a 2-core VM
    /usr/bin/python3 benchmarks/run.py              # the full run (bigger files, longer timings)

Writes <out>/results.json, <out>/results.md (tables, and the targets
with their measured ratios) and <out>/<profile>.png. Every figure of a table is
measured in this run; ratios compare systems of the same profile and order.

Profiles: tiny (a few scalars + 16 floats, ~100 B), medium (16 KiB float32),
large (1 MiB float32), varlen (float32 of 1-8 K values, padded in batches).
Systems: a memcpy ceiling (C++: each sample's tensor bytes gathered in the same
order from memory into a reused buffer; "0 threads" = the calling thread, the
reference of the single-threaded paths), raw liblmdb
get+copy (C++), torch_lmdb native C++ DataLoader (get_batch, get+Stack), the native
torch_lmdb::make_loader (2 threads; its target row is medium's), torch_lmdb
Python (ds[i] through DataLoader, get_batch in process, make_loader), py-lmdb +
pickle (the design torch_lmdb replaces), Zarr and h5py Datasets, an in-memory
Dataset (the DataLoader's own floor); writers: torch_lmdb vs py-lmdb + pickle.
With the medium profile: cold reads (benchmarks/bench_cold.py) and compression
(benchmarks/bench_compression.py: database sizes against the Zarr stores,
get_batch per codec against the uncompressed database).
"""
import argparse
import gc
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.utils.data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch_lmdb  # noqa: E402

MB = 1e6
MEMCPY = "memcpy ceiling (C++ gather, reused buffer)"


# ---- profiles ---------------------------------------------------------------
def make_sample(profile, i, rng):
    if profile == "tiny":
        return {"id": np.int64(i), "label": np.int32(i % 10), "weight": np.float32(1.0),
                "v": rng.standard_normal(16).astype(np.float32)}
    if profile == "medium":
        return {"x": rng.standard_normal(4096).astype(np.float32), "y": np.int64(i)}
    if profile == "large":
        return {"x": rng.standard_normal(262144).astype(np.float32), "y": np.int64(i)}
    if profile == "varlen":
        return {"x": rng.standard_normal(int(rng.integers(1024, 8193))).astype(np.float32), "y": np.int64(i)}
    raise ValueError(profile)


def payload_bytes(sample):
    return sum(np.asarray(v).nbytes for v in sample.values())


SIZES = {  # samples per profile: quick, full
    "tiny": (200_000, 1_000_000),
    "medium": (20_000, 60_000),
    "large": (300, 1_500),
    "varlen": (10_000, 40_000),
}
BATCH = {"tiny": 256, "medium": 256, "large": 16, "varlen": 256}


# ---- measurement helpers ------------------------------------------------------
def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class PeakPss:
    """Peak PSS of this process and its children (DataLoader workers), polled."""

    def __enter__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_kib(me) + sum(pss_kib(c) for c in children(me)))
            self._stop.wait(0.25)  # smaps_rollup walks page tables: polling costs CPU

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_now():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(batches, budget, warmup=True):
    """Iterates ``batches`` (an iterator of (n_samples, n_bytes)) for ``budget`` seconds
    (or until it ends) after a warm-up of budget/3 (none with ``warmup=False``); returns
    samples/s, bytes/s, CPU us/sample, peak PSS."""
    gc.collect()
    with PeakPss() as pss:
        it = iter(batches)
        t0 = time.perf_counter()
        for _ in it if warmup else ():  # warm-up: worker start-up, first page touches, buffer pools
            if time.perf_counter() - t0 >= budget / 3:
                break
        cpu0, t0 = cpu_now(), time.perf_counter()
        samples = nbytes = 0
        for n, b in it:
            samples += n
            nbytes += b
            if time.perf_counter() - t0 >= budget:
                break
        wall = time.perf_counter() - t0
        del it
        gc.collect()
        cpu = cpu_now() - cpu0
    return dict(samples_per_s=samples / wall, mb_per_s=nbytes / wall / MB,
                cpu_us_per_sample=1e6 * cpu / max(samples, 1), peak_pss_mib=pss.peak / 1024, measured_samples=samples)


def epochs(order, n, batch, seed=0):
    """Index batches forever: shuffled (a new permutation per epoch) or sequential."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.permutation(n) if order == "shuffled" else np.arange(n)
        for s in range(0, n - batch + 1, batch):
            yield idx[s:s + batch]


def first_epoch(batches, n):
    """The batches of ``batches`` up to n samples: cold reads stop before a sample is read twice."""
    seen = 0
    for k, nbytes in batches:
        yield k, nbytes
        seen += k
        if seen >= n:
            return


def block_shuffled(path):
    """Cold reads in block-shuffled order: contiguous key ranges, OS readahead on."""
    ds = torch_lmdb.LMDBDataset(path, os_readahead=True)
    for epoch in itertools.count():
        for batch in ds.iter_batches(256, shuffle=True, seed=epoch, block_size=1024, threads=2, batches_ahead=4):
            nbytes, k = batch_bytes(batch)
            yield k, nbytes


def batch_bytes(batch):
    if isinstance(batch, dict):
        return sum(v.element_size() * v.numel() for v in batch.values() if isinstance(v, torch.Tensor)), \
            len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    raise TypeError(type(batch))


def loader_batches(loader):
    """Batches of a DataLoader, epoch after epoch (workers persist across epochs)."""
    while True:
        for batch in loader:
            nbytes, n = batch_bytes(batch)
            yield n, nbytes


def drop_cache(paths):
    """Evicts files from the page cache (cold reads); returns False if it cannot."""
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


# ---- the systems --------------------------------------------------------------
class PickleLMDBDataset(torch.utils.data.Dataset):
    """The design torch_lmdb replaces: py-lmdb + pickled dicts, opened lazily per process."""

    def __init__(self, path):
        import lmdb

        self.path = path
        env = lmdb.open(path, readonly=True, lock=False)
        self.n = env.stat()["entries"]
        env.close()
        self.env = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import lmdb

        if self.env is None:
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin(buffers=True) as txn:
            d = pickle.loads(txn.get(str(int(i)).encode()))
        return {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}

    def __getstate__(self):
        return dict(self.__dict__, env=None)


class ZarrDataset(torch.utils.data.Dataset):
    def __init__(self, path):
        import zarr

        self.path = path
        self.n = zarr.open_group(path, mode="r")["y" if "y" in zarr.open_group(path, mode="r") else "id"].shape[0]
        self.root = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import zarr

        if self.root is None:
            self.root = zarr.open_group(self.path, mode="r")
        return {k: torch.from_numpy(np.asarray(a[i])) for k, a in self.root.arrays()}

    def __getstate__(self):
        return dict(self.__dict__, root=None)


class H5Dataset(torch.utils.data.Dataset):
    def __init__(self, path):
        import h5py

        self.path = path
        with h5py.File(path, "r") as f:
            self.keys = list(f.keys())
            self.n = f[self.keys[0]].shape[0]
        self.f = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import h5py

        if self.f is None:
            self.f = h5py.File(self.path, "r")
        return {k: torch.from_numpy(np.asarray(self.f[k][i])) for k in self.keys}

    def __getstate__(self):
        return dict(self.__dict__, f=None)


class MemoryDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def du(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _write_torch_lmdb(path, samples):
    with torch_lmdb.LMDBWriter(path) as w:
        w.write_many(samples)


def _write_pickle(path, samples, map_size, values=None):
    """py-lmdb + pickle, committing every 4096 samples, synced at the end.
    With `values` (pre-pickled), it times LMDB's own write cost alone."""
    import lmdb

    env = lmdb.open(path, map_size=map_size)
    txn = env.begin(write=True)
    for i, s in enumerate(samples):
        txn.put(str(i).encode(), values[i] if values else pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL))
        if (i + 1) % 4096 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.sync()
    env.close()


WRITE_REPEATS = 3
READ_ROUNDS = 2  # the full run's interleaved rounds of every read measurement


def keep_best(best, row):
    """Keeps, per system, the row of its fastest round; every round's samples/s is listed."""
    old = best.get(row["system"])
    runs = (old["rounds_samples_per_s"] if old else []) + [row["samples_per_s"]]
    if old is None or row["samples_per_s"] > old["samples_per_s"]:
        best[row["system"]] = row
    best[row["system"]]["rounds_samples_per_s"] = runs


def write_stores(profile, n, out, log):
    """Writes the profile with torch_lmdb and py-lmdb+pickle (timed: the writer
    benchmark, WRITE_REPEATS interleaved runs each, every one started after a
    sync, the best one kept: this VM's page-cache and disk times vary from run
    to run), and as Zarr and HDF5.
    Returns the samples, their mean payload, the paths and the writer rows."""
    import h5py
    import zarr

    rng = np.random.default_rng(0)
    samples = [make_sample(profile, i, rng) for i in range(n)]
    nbytes = sum(payload_bytes(s) for s in samples)
    paths = {k: os.path.join(out, f"{profile}.{k}") for k in ("torch_lmdb", "pickle_lmdb", "floor_lmdb", "zarr", "h5")}
    pickled = [pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL) for s in samples]
    map_size = max(1 << 30, 4 * nbytes)
    writers = {
        "torch_lmdb write_many": ("torch_lmdb", lambda p: _write_torch_lmdb(p, samples)),
        "py-lmdb + pickle": ("pickle_lmdb", lambda p: _write_pickle(p, samples, map_size)),
        "py-lmdb put of pre-pickled values (LMDB's own write cost)": ("floor_lmdb",
                                                                     lambda p: _write_pickle(p, samples, map_size, pickled)),
    }
    seconds = {system: [] for system in writers}
    for _ in range(WRITE_REPEATS):
        for system, (store, write) in writers.items():
            shutil.rmtree(paths[store], ignore_errors=True)
            gc.collect()
            os.sync()  # dirty pages and the removal's discards are written out before the clock starts
            t0 = time.perf_counter()
            write(paths[store])
            seconds[system].append(time.perf_counter() - t0)
    del pickled
    shutil.rmtree(paths["floor_lmdb"], ignore_errors=True)
    for p in (paths["zarr"], paths["h5"]):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
    writer_rows = []
    for system, (store, _) in writers.items():
        best = min(seconds[system])
        writer_rows.append(dict(profile=profile, system=system, samples_per_s=n / best, mb_per_s=nbytes / best / MB,
                                db_mib=du(paths[store]) / 2**20 if os.path.exists(paths[store]) else None,
                                runs_s=seconds[system]))
    if profile != "varlen":
        root = zarr.open_group(paths["zarr"], mode="w")
        h5 = h5py.File(paths["h5"], "w")
        for k in samples[0]:
            column = np.stack([s[k] for s in samples])
            root.array(k, column)  # zarr's default chunking, as the users' simulator did
            h5.create_dataset(k, data=column)  # h5py's default: contiguous
        h5.close()
    log(f"  wrote {profile}: {n} samples, {nbytes / MB:.0f} MB payload")
    return samples, nbytes / n, paths, writer_rows


def pad_collate(items):
    """Variable-length samples: pad ``x`` like get_batch(pad=True) does."""
    xs = [item["x"] for item in items]
    return {"x": torch.nn.utils.rnn.pad_sequence(xs, batch_first=True),
            "x_lengths": torch.tensor([[len(x)] for x in xs]),
            "y": torch.stack([item["y"] for item in items])}


def python_systems(profile, order, samples, paths, quick):
    """(name, factory of an iterator of (n, bytes)) for every Python-side system."""
    B = BATCH[profile]
    n = len(samples)
    pad = profile == "varlen"
    ds = torch_lmdb.LMDBDataset(paths["torch_lmdb"], pad=pad)
    shuffle = order == "shuffled"

    def dl(dataset, workers):
        collate = pad_collate if pad else None
        return lambda: loader_batches(torch.utils.data.DataLoader(
            dataset, batch_size=B, shuffle=shuffle, num_workers=workers, collate_fn=collate,
            persistent_workers=workers > 0, drop_last=True))

    def get_batch():
        for idx in epochs(order, n, B):
            batch = ds.get_batch(idx.tolist())
            nbytes, k = batch_bytes(batch)
            yield k, nbytes

    def iter_batches(threads):
        def epochs_of_batches():  # a new stream (and seed) per epoch, as a training loop would
            for epoch in itertools.count():
                for batch in ds.iter_batches(B, shuffle=shuffle, seed=epoch, drop_last=True, threads=threads):
                    nbytes, k = batch_bytes(batch)
                    yield k, nbytes
        return epochs_of_batches

    systems = [("torch_lmdb get_batch in process", get_batch),
               ("torch_lmdb iter_batches, 1 C++ thread, prefetch 2", iter_batches(1)),
               ("torch_lmdb iter_batches, 2 C++ threads, prefetch 2", iter_batches(2))]
    systems += [
        ("torch_lmdb make_loader, num_workers=0",
         lambda: loader_batches(torch_lmdb.make_loader(ds, B, shuffle=shuffle, drop_last=True))),
        ("torch_lmdb make_loader, num_workers=2",
         lambda: loader_batches(torch_lmdb.make_loader(ds, B, shuffle=shuffle, drop_last=True, num_workers=2,
                                                       persistent_workers=True))),
        ("torch_lmdb ds[i] DataLoader, num_workers=0", dl(torch_lmdb.LMDBDataset(paths["torch_lmdb"]), 0)),
        ("torch_lmdb ds[i] DataLoader, num_workers=2", dl(torch_lmdb.LMDBDataset(paths["torch_lmdb"]), 2)),
        ("py-lmdb + pickle DataLoader, num_workers=0", dl(PickleLMDBDataset(paths["pickle_lmdb"]), 0)),
        ("py-lmdb + pickle DataLoader, num_workers=2", dl(PickleLMDBDataset(paths["pickle_lmdb"]), 2)),
    ]
    if profile != "varlen":
        systems += [
            ("zarr Dataset, num_workers=0", dl(ZarrDataset(paths["zarr"]), 0)),
            ("h5py Dataset, num_workers=0", dl(H5Dataset(paths["h5"]), 0)),
        ]
        mem = [{k: torch.from_numpy(np.asarray(v)) for k, v in s.items()} for s in samples]
        systems.append(("in-memory Dataset, num_workers=0 (DataLoader floor)", dl(MemoryDataset(mem), 0)))
    return systems


def native(binary, path, mode, threads, batch, order, budget, pad):
    proc = subprocess.run([binary, "--path", path, "--mode", mode, "--threads", str(threads), "--batch", str(batch),
                           "--order", order, "--seconds", str(budget), "--pad", "1" if pad else "0"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{binary} {mode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# ---- report -------------------------------------------------------------------
def _warm(profile, system):
    return (profile, "shuffled", "warm", system)


TARGETS = [
    # (label, numerator (profile, order, cache, system[, field]), denominator, target ratio)
    ("Python `get_batch` in process, shuffled, batch 256 / memcpy ceiling",
     _warm("medium", "torch_lmdb get_batch in process"),
     _warm("medium", f"{MEMCPY}, 0 threads"), 0.5),
    ("Python `get_batch` in process, shuffled, batch 256 / py-lmdb + pickle num_workers=0",
     _warm("medium", "torch_lmdb get_batch in process"),
     _warm("medium", "py-lmdb + pickle DataLoader, num_workers=0"), 4.0),
    ("tiny: `get_batch` in process / py-lmdb + pickle num_workers=0",
     _warm("tiny", "torch_lmdb get_batch in process"),
     _warm("tiny", "py-lmdb + pickle DataLoader, num_workers=0"), 8.0),
    ("`ds[i]` drop-in, DataLoader num_workers=0 / py-lmdb + pickle num_workers=0",
     _warm("medium", "torch_lmdb ds[i] DataLoader, num_workers=0"),
     _warm("medium", "py-lmdb + pickle DataLoader, num_workers=0"), 1.5),
    ("`make_loader` num_workers=2 / py-lmdb + pickle num_workers=2",
     _warm("medium", "torch_lmdb make_loader, num_workers=2"),
     _warm("medium", "py-lmdb + pickle DataLoader, num_workers=2"), 5.0),
    ("native C++ DataLoader `get_batch`, 2 threads, batch 256 / raw liblmdb get+copy, 2 threads",
     _warm("medium", "C++ get_batch (StackedDataset), 2 threads"),
     _warm("medium", "C++ raw liblmdb get+copy, 2 threads"), 0.8),
    ("native C++ `torch_lmdb::make_loader`, 2 threads, batch 256 / raw liblmdb get+copy, 2 threads",
     _warm("medium", "C++ torch_lmdb::make_loader, 2 threads"),
     _warm("medium", "C++ raw liblmdb get+copy, 2 threads"), 0.95),
    ("tiny: C++ `get_batch`, 2 threads / raw liblmdb random gets, 2 threads",
     _warm("tiny", "C++ get_batch (StackedDataset), 2 threads"),
     _warm("tiny", "C++ raw liblmdb get+copy, 2 threads"), 0.8),
    ("large: `get_batch` in process / memcpy ceiling",
     _warm("large", "torch_lmdb get_batch in process"),
     _warm("large", f"{MEMCPY}, 0 threads"), 0.6),
    ("writer, medium: torch_lmdb / py-lmdb + pickle (samples/s)",
     ("medium", "write", "-", "torch_lmdb write_many"), ("medium", "write", "-", "py-lmdb + pickle"), 2.0),
    ("writer, medium: database size, py-lmdb + pickle / torch_lmdb (>= 1: no larger)",
     ("medium", "write", "-", "py-lmdb + pickle", "db_mib"), ("medium", "write", "-", "torch_lmdb write_many", "db_mib"),
     1.0),
    ("vs Zarr, shuffled medium: `get_batch` in process / zarr Dataset",
     _warm("medium", "torch_lmdb get_batch in process"),
     _warm("medium", "zarr Dataset, num_workers=0"), 100.0),
]


def lookup(rows, key):
    profile, order, cache, system = key[:4]
    field = key[4] if len(key) > 4 else "samples_per_s"
    for r in rows:
        if (r["profile"], r.get("order", "write"), r.get("cache", "-"), r["system"]) == (profile, order, cache, system):
            return r[field]
    return None


def report(rows, out, command, machine, method):
    lines = [f"Measured by `{command}` on {machine}. {method}", ""]
    lines += ["### Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for label, num, den, goal in TARGETS:
        a, b = lookup(rows, num), lookup(rows, den)
        if a is None or b is None:
            lines.append(f"| {label} | not measured | ≥ {goal:g}× | – |")
            continue
        ratio = a / b
        lines.append(f"| {label} | {ratio:.2f}× | ≥ {goal:g}× | {'yes' if ratio >= goal else '**no**'} |")
    for profile in SIZES:
        prof = [r for r in rows if r["profile"] == profile and r.get("order") != "write" and r.get("cache") != "cold"]
        if not prof:
            continue
        lines += ["", f"### {profile}", "",
                  "| order | cache | system | samples/s | MB/s | vs memcpy | vs pickle nw0 | CPU µs/sample | peak PSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in prof:
            lines.append(
                f"| {r['order']} | {r['cache']} | {r['system']} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:,.0f} | "
                f"{_ratio(r.get('vs_memcpy'))} | {_ratio(r.get('vs_pickle_nw0'))} | {r['cpu_us_per_sample']:.2f} | "
                f"{_num(r.get('peak_pss_mib'))} |")
    cold = [r for r in rows if r.get("cache") == "cold"]
    if cold:
        lines += ["", "### cold (medium: the file evicted before each run; disk measured by fio in the same run)", "",
                  "| order | system | samples/s | MB/s | vs disk | vs pickle cold | CPU µs/sample | "
                  "page cache growth MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cold:
            lines.append(f"| {r['order']} | {r['system']} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:,.0f} | "
                         f"{_ratio(r.get('vs_disk'))} | {_ratio(r.get('vs_pickle_cold'))} | "
                         f"{_num1(r.get('cpu_us_per_sample'))} | {_num(r.get('page_cache_growth_mib'))} |")
    comp = [r for r in rows if r.get("cache") == "compression"]
    if comp:
        lines += ["", "### Compression (Zarr sources converted with `--compression auto` (LZ4) and `zstd`; "
                  "packed values)", "",
                  "| measured | system | samples/s | MiB | ratio | vs | bar | met |", "|---|---|---|---|---|---|---|---|"]
        for r in comp:
            bar = r.get("bar")
            met = "–"
            if bar:
                op, goal = bar.split()
                met = "yes" if (r["ratio"] <= float(goal) if op == "<=" else r["ratio"] >= float(goal)) else "**no**"
            lines.append(f"| {r['measured']} | {r['system']} | {_num(r.get('samples_per_s'))} | "
                         f"{_num1(r['bytes'] / 2**20) if r.get('bytes') else '–'} | {r['ratio']:.2f}× | {r['vs']} | "
                         f"{(bar.replace('<=', '≤').replace('>=', '≥') + '×') if bar else '–'} | {met} |")
    compose = [r for r in rows if r.get("cache") == "compose"]
    if compose:
        import bench_compose

        lines += ["", "### Mixtures and selections (benchmarks/bench_compose.py)", ""] + bench_compose.table(compose)
    writes = [r for r in rows if r.get("order") == "write"]
    lines += ["", f"### Writers (best of {WRITE_REPEATS} interleaved runs; every run in seconds)", "",
              "| profile | system | samples/s | MB/s | database MiB | runs (s) |", "|---|---|---|---|---|---|"]
    for r in writes:
        lines.append(f"| {r['profile']} | {r['system']} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:,.0f} | "
                     f"{_num1(r['db_mib'])} | {', '.join(f'{t:.2f}' for t in r.get('runs_s', []))} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def _ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def _num1(x):
    return "–" if x is None else f"{x:.1f}"


def _num(x):
    return "–" if x is None else f"{x:,.0f}"


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for profile in SIZES:
        prof = [r for r in rows if r["profile"] == profile and r.get("order") == "shuffled" and r["cache"] == "warm"]
        if not prof:
            continue
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(prof) + 1.2))
        names = [r["system"] for r in prof]
        ax.barh(range(len(prof)), [r["samples_per_s"] for r in prof],
                color=["tab:green" if "torch_lmdb" in n or "C++ get" in n else "tab:gray" for n in names])
        ax.set_yticks(range(len(prof)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("samples/s (log scale, shuffled, warm cache)")
        ax.set_title(f"{profile} profile")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{profile}.png"), dpi=110)
        plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller files, shorter timings (< 5 minutes)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_out"), help="results directory")
    parser.add_argument("--data", default="/tmp/torch_lmdb_bench", help="where the benchmark databases go")
    parser.add_argument("--bin", default=os.path.join(ROOT, "build", "cmake", "torch_lmdb_bench_read"),
                        help="the native benchmark binary (built by `make build`)")
    parser.add_argument("--profiles", default=",".join(SIZES), help="comma-separated subset of profiles")
    args = parser.parse_args()
    if not os.path.exists(args.bin):
        raise SystemExit(f"{args.bin} is missing: run `make build` first")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.data, exist_ok=True)
    budget = 1.0 if args.quick else 2.0  # seconds per measurement
    rounds = 1 if args.quick else READ_ROUNDS
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rows = []

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    for profile in args.profiles.split(","):
        n = SIZES[profile][0 if args.quick else 1]
        samples, sample_bytes, paths, writer_rows = write_stores(profile, n, args.data, log)
        for r in writer_rows:
            rows.append(dict(r, order="write", cache="-"))
        orders = ["shuffled", "sequential"] if profile in ("medium", "tiny") or not args.quick else ["shuffled"]
        for order in orders:
            # Every system is measured in `rounds` interleaved rounds and keeps its best:
            # a few seconds of a noisy neighbour on this VM then cost one round, not the figure.
            best = {}
            for rnd in range(rounds):
                for name, factory in python_systems(profile, order, samples, paths, args.quick):
                    slow = name.startswith(("zarr", "h5py"))
                    if slow and rnd > 0:
                        continue  # seconds per batch; far from every bar
                    r = measure(factory(), budget / 2 if slow else budget)
                    keep_best(best, dict(profile=profile, order=order, cache="warm", system=name, **r))
                    log(f"  {profile:6} {order:10} {name:55} {r['samples_per_s']:>12,.0f} samples/s")
                for mode, label in (("memcpy", MEMCPY), ("raw", "C++ raw liblmdb get+copy"),
                                    ("get_batch", "C++ get_batch (StackedDataset)"),
                                    ("get_stack", "C++ get + Stack (Dataset)"),
                                    ("loader", "C++ torch_lmdb::make_loader")):
                    for threads in (0, 1, 2):
                        if (order == "sequential" and mode == "get_stack") or (mode == "memcpy" and profile == "varlen") \
                                or (mode == "memcpy" and threads == 1) or (mode == "loader" and threads != 2):
                            continue
                        r = native(args.bin, paths["torch_lmdb"], mode, threads, BATCH[profile], order, budget,
                                   profile == "varlen")
                        name = f"{label}, {threads} thread{'s' if threads != 1 else ''}"
                        keep_best(best, dict(profile=profile, order=order, cache="warm", system=name,
                                             samples_per_s=r["samples_per_s"],
                                             mb_per_s=r["samples_per_s"] * sample_bytes / MB,
                                             cpu_us_per_sample=r["cpu_us_per_sample"], peak_pss_mib=None,
                                             major_faults=r["major_faults"]))
                        # Major faults in a warm run: the file's pages were read from disk again.
                        faults = f"  ({r['major_faults']:,.0f} major page faults)" if r["major_faults"] else ""
                        log(f"  {profile:6} {order:10} {name:55} {r['samples_per_s']:>12,.0f} samples/s{faults}")
            prof_rows = list(best.values())
            rows += prof_rows
        if profile == "medium":  # cold: the disk (fio) and every system with the file evicted first
            import bench_cold

            gc.collect()
            rows += bench_cold.run_cold(paths, n, sample_bytes, budget, log)
        # ratios within the profile
        for r in rows:
            if r["profile"] != profile or r.get("order") == "write":
                continue
            mem = lookup(rows, (profile, r["order"], "warm", f"{MEMCPY}, 0 threads"))
            pk = lookup(rows, (profile, r["order"], "warm", "py-lmdb + pickle DataLoader, num_workers=0"))
            r["vs_memcpy"] = r["samples_per_s"] / mem if mem else None
            r["vs_pickle_nw0"] = r["samples_per_s"] / pk if pk else None
        del samples
        gc.collect()

    if "medium" in args.profiles.split(","):  # compression: sizes against Zarr, get_batch per codec
        import bench_compression

        for r in bench_compression.run(args.quick, log=log):
            rows.append(dict(r, measured=r["profile"], profile="compression", order="-", cache="compression"))
        import bench_compose  # mixtures and selections

        for r in bench_compose.run(args.quick, log=log, work_dir=args.data):
            rows.append(dict(r, profile="compose", order="-", cache="compose"))

    command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    machine = f"{os.cpu_count()} cores, torch {torch.__version__}, torch_lmdb {torch_lmdb.__version__}"
    method = (f"Reads: {budget:g} s per measurement after a warm-up of a third of it"
              + (f", the best of {rounds} interleaved rounds (zarr and h5py: one round)." if rounds > 1 else ".")
              + " Cold reads: files evicted first, no warm-up, at most one epoch (no sample read twice).")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "machine": machine, "method": method, "rows": rows}, f, indent=1)
    text = report(rows, args.out, command, machine, method)
    plot(rows, args.out)
    print(text)
    log(f"done: {args.out}/results.json, results.md, <profile>.png")


if __name__ == "__main__":
    main()

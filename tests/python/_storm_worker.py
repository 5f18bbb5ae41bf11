"""Subprocess side of tests/python/test_storms.py (not a test module).

Every storm runs here, in a process of its own, so that a signal (SIGSEGV,
SIGBUS) kills this process and shows up in the test as a failure with the
signal's name, instead of killing pytest. Results are printed as one JSON line
prefixed with ``RESULT `` on stdout; problems make the process exit 1 after
printing what went wrong.

    python _storm_worker.py kill-storm PATH --seed S --kills K
    python _storm_worker.py write-growing PATH --sessions-growths G --seed S
    python _storm_worker.py threaded-readers PATH --stop-file F --seed S
    python _storm_worker.py same-process PATH --seed S
    python _storm_worker.py hold PATH --max-readers N
    python _storm_worker.py probe PATH --max-readers N
    python _storm_worker.py fill PATH --seed S
    python _storm_worker.py create PATH
    python _storm_worker.py check PATH [--expect N]
"""
import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import torch_lmdb  # noqa: E402

# Databases being appended to are marked incomplete; readers say so once per open.
warnings.filterwarnings("ignore", message=".*is incomplete", category=RuntimeWarning)

WIDTH = 256  # fixed-shape samples (batches stack without padding)


def storm_sample(i: int) -> dict:
    """Sample i: every value derived from i, so any sample can be checked alone."""
    return {"i": i, "x": np.arange(WIDTH, dtype=np.float32) + np.float32(i % 100003),
            "tag": f"s{i}"}


def check_sample(i: int, got: dict) -> None:
    """Raises AssertionError unless ``got`` is exactly storm_sample(i)."""
    if set(got) != {"i", "x", "tag"}:
        raise AssertionError(f"sample {i}: fields {sorted(got)}")
    if got["i"].dtype != torch.int64 or got["i"].item() != i:
        raise AssertionError(f"sample {i}: i = {got['i']!r}")
    want = torch.from_numpy(storm_sample(i)["x"])
    if got["x"].dtype != torch.float32 or not torch.equal(got["x"], want):
        raise AssertionError(f"sample {i}: x differs (first values {got['x'][:4].tolist()})")
    if got["tag"] != f"s{i}":
        raise AssertionError(f"sample {i}: tag = {got['tag']!r}")


def check_batch(indices, batch: dict) -> None:
    """Raises AssertionError unless ``batch`` is exactly the stacked samples ``indices``."""
    idx = torch.tensor(list(indices), dtype=torch.int64)
    if not torch.equal(batch["i"], idx):
        raise AssertionError(f"batch i = {batch['i'][:8].tolist()}..., wanted {idx[:8].tolist()}...")
    want = torch.arange(WIDTH, dtype=torch.float32).unsqueeze(0) + (idx % 100003).to(torch.float32).unsqueeze(1)
    if not torch.equal(batch["x"], want):
        bad = (batch["x"] != want).any(dim=1).nonzero().flatten().tolist()
        raise AssertionError(f"batch x differs at rows {bad[:8]} (indices {[indices[b] for b in bad[:8]]})")
    if list(batch["tag"]) != [f"s{i}" for i in indices]:
        raise AssertionError("batch tag differs")


def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


# -- 1. SIGKILL storm ---------------------------------------------------------
def _verify_child(path: str, start: int, spot: int, seed: int, wfd: int) -> None:
    """Forked child: verifies samples [start, n) and ``spot`` random older ones;
    writes n (or an error) to wfd."""
    try:
        ds = torch_lmdb.LMDBDataset(path, verify=True)
        n = len(ds)
        rng = random.Random(seed)
        older = [rng.randrange(start) for _ in range(spot)] if start else []
        for i in list(range(start, n)) + older:
            check_sample(i, ds[i])
        msg = {"n": n, "complete": bool(ds.metadata.get("complete"))}
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        msg = {"error": describe(e), "trace": traceback.format_exc()}
    os.write(wfd, json.dumps(msg).encode())
    os._exit(0)


def _run_child(target, *args, timeout: float = 120.0):
    """Forks, runs target(*args, wfd) in the child; returns (status, message dict)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            target(*args, w)
        finally:
            os._exit(3)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, (json.loads(data) if data else None)


def _writer_child(path: str, first_report: int, map_size: int, commit_every: int, wfd: int) -> None:
    """Forked child: appends samples first, first+1, ... (mode "a", small map)
    and never stops by itself: it tells the parent len(w) at open, then
    ``{"wrote": k}`` once it wrote ``first_report`` samples, and writes on
    until it is killed (so the kill always lands in a write, a commit or a
    map growth, however loaded the machine)."""
    try:
        w = torch_lmdb.LMDBWriter(path, mode="a", map_size=map_size, commit_every=commit_every)
        first = len(w)
        os.write(wfd, (json.dumps({"open_len": first}) + "\n").encode())
        i = first
        while True:
            if i - first == first_report:
                os.write(wfd, (json.dumps({"wrote": first_report}) + "\n").encode())
            w.write(storm_sample(i))
            i += 1
    except BaseException as e:  # noqa: BLE001
        os.write(wfd, (json.dumps({"error": describe(e)}) + "\n").encode())
    os._exit(0)


def _clean_append_child(path: str, wfd: int) -> None:
    """Forked child: appends 100 samples and closes cleanly."""
    try:
        with torch_lmdb.LMDBWriter(path, mode="a", map_size=32 << 10, commit_every=7) as w:
            for i in range(len(w), len(w) + 100):
                w.write(storm_sample(i))
        msg = {"n": len(w)}
    except BaseException as e:  # noqa: BLE001
        msg = {"error": describe(e)}
    os.write(wfd, json.dumps(msg).encode())
    os._exit(0)


def cmd_kill_storm(a) -> int:
    rng = random.Random(a.seed)
    print(f"kill-storm seed={a.seed}", flush=True)
    path = a.path
    verified = 0  # samples [0, verified) checked exactly
    kills = mid_write_kills = cycles = 0
    problems = []
    while mid_write_kills < a.kills and cycles < a.kills * 3:
        cycles += 1
        if os.path.exists(os.path.join(path, "data.mdb")):
            status, msg = _run_child(_verify_child, path, verified, 64, rng.randrange(2**31))
        else:
            status, msg = 0, {"n": 0}
        if not os.WIFEXITED(status) or msg is None or "error" in msg:
            problems.append(f"cycle {cycles}: verifying after the previous kill: {_status_text(status)} {msg}")
            break
        n = msg["n"]
        if n < verified:
            problems.append(f"cycle {cycles}: {n} samples after a kill, {verified} were committed and verified before")
            break
        verified = n
        map_size = rng.choice([32 << 10, 64 << 10, 256 << 10, 1 << 20])
        commit_every = rng.choice([1, 2, 5, 17, 64, 200, 1000])
        # The kill lands a random time after the writer reported `quota`
        # samples (0: right after the open). The writer never stops by
        # itself, so every kill is mid-write; a kill used to be a race
        # between this timer and a writer with a quota, which a loaded
        # machine decided (48 of 50 mid-write kills in 150 cycles).
        quota = rng.choice([0, 1, rng.randrange(2, 4000)])
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _writer_child(path, quota, map_size, commit_every, wfd)
            finally:
                os._exit(3)
        os.close(wfd)
        reader = os.fdopen(r)
        line = reader.readline()  # written once the writer is open
        first = json.loads(line) if line else None
        if first is None or "open_len" not in first:
            _, status = os.waitpid(pid, 0)
            problems.append(f"cycle {cycles}: append after a kill failed: {first} ({_status_text(status)})")
            reader.close()
            break
        if first["open_len"] != n:
            problems.append(f"cycle {cycles}: the writer opened with {first['open_len']} samples, {n} verified")
        if quota > 0:
            line = reader.readline()  # written once the writer wrote `quota` samples
            if '"wrote"' not in line:
                _, status = os.waitpid(pid, 0)
                problems.append(f"cycle {cycles}: the writer stopped before {quota} samples: {line.strip()} "
                                f"({_status_text(status)})")
                reader.close()
                break
        time.sleep(rng.random() * 0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # reaped below
            pass
        _, status = os.waitpid(pid, 0)
        rest = reader.read()
        reader.close()
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            kills += 1
            if '"closed_len"' not in rest:
                mid_write_kills += 1
        elif os.WIFSIGNALED(status):
            problems.append(f"cycle {cycles}: the writer died by itself: {_status_text(status)}")
            break
        if '"error"' in rest:
            problems.append(f"cycle {cycles}: writer error (map_size={map_size}, commit_every={commit_every}): {rest.strip()}")
            break
    # Last: one clean append, then every sample, exactly.
    if not problems:
        status, msg = _run_child(_clean_append_child, path)
        if not os.WIFEXITED(status) or msg is None or "error" in msg:
            problems.append(f"final clean append: {_status_text(status)} {msg}")
        status, msg = _run_child(_verify_child, path, 0, 0, 0)
        if not os.WIFEXITED(status) or msg is None or "error" in msg:
            problems.append(f"final verification: {_status_text(status)} {msg}")
        elif not msg["complete"]:
            problems.append("final verification: a clean close did not mark the database complete")
        else:
            verified = msg["n"]
    for p in problems:
        print("PROBLEM " + p, flush=True)
    result(seed=a.seed, cycles=cycles, kills=kills, mid_write_kills=mid_write_kills, samples=verified,
           problems=problems)
    return 1 if problems else 0


# -- 2. threaded readers while another process grows the map ------------------
def cmd_write_growing(a) -> int:
    """Appends in sessions that each reopen with a tiny map_size (so the map
    grows again in every session); counts the growths it saw."""
    rng = random.Random(a.seed)
    print(f"write-growing seed={a.seed}", flush=True)
    growths = sessions = 0
    while growths < a.growths or sessions < a.min_sessions:
        sessions += 1
        with torch_lmdb.LMDBWriter(a.path, mode="a", map_size=64 << 10,
                                   commit_every=rng.choice([16, 64, 256])) as w:
            last = w.map_size
            start = len(w)
            for i in range(start, start + a.per_session):
                w.write(storm_sample(i))
                size = w.map_size
                if size > last:
                    growths += 1
                    last = size
            w.flush()
            if w.map_size > last:
                growths += 1
        del w
        if a.initial:
            break
    result(sessions=sessions, growths=growths)
    return 0


def cmd_threaded_readers(a) -> int:
    rng = random.Random(a.seed)
    print(f"threaded-readers seed={a.seed}", flush=True)
    ds = torch_lmdb.LMDBDataset(a.path, verify=True)
    n0 = len(ds)
    stop = threading.Event()
    errors = []
    counts = {"stream_batches": 0, "get_batches": 0, "reopens": 0}
    lock = threading.Lock()

    def fail(where, e):
        with lock:
            errors.append(f"{where}: {describe(e)}\n{traceback.format_exc()}")
        stop.set()

    def streams():
        seed = rng.randrange(2**31)
        try:
            while not stop.is_set():
                seed += 1
                it = ds.iter_batches(64, shuffle=True, seed=seed, threads=2, batches_ahead=4)
                for k, batch in enumerate(it):
                    check_batch(it.batch_indices(k), batch)
                    with lock:
                        counts["stream_batches"] += 1
                    if stop.is_set():
                        break
        except BaseException as e:  # noqa: BLE001
            fail("iter_batches(threads=2)", e)

    def getters(tseed):
        r = random.Random(tseed)
        local = ds
        try:
            k = 0
            while not stop.is_set():
                k += 1
                if k % 25 == 0:  # a new dataset on the same path sees the samples appended since
                    local = torch_lmdb.LMDBDataset(a.path, verify=True)
                    with lock:
                        counts["reopens"] += 1
                n = len(local)
                idx = [r.randrange(n) for _ in range(r.randrange(1, 64))]
                check_batch(idx, local.get_batch(idx))
                if k % 7 == 0:
                    i = r.randrange(n)
                    check_sample(i, local[i])
                with lock:
                    counts["get_batches"] += 1
        except BaseException as e:  # noqa: BLE001
            fail("get_batch thread", e)

    threads = [threading.Thread(target=streams)] + [
        threading.Thread(target=getters, args=(rng.randrange(2**31),)) for _ in range(3)]
    for t in threads:
        t.start()
    print("READY", flush=True)
    deadline = time.monotonic() + a.max_seconds  # a safety net, not an assertion
    while not stop.is_set() and not os.path.exists(a.stop_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    final = torch_lmdb.LMDBDataset(a.path, verify=True)
    for p in errors:
        print("PROBLEM " + p, flush=True)
    result(initial_len=n0, final_len=len(final), errors=errors, **counts)
    return 1 if errors else 0


# -- 3. a writer and datasets in one process ----------------------------------
def cmd_same_process(a) -> int:
    rng = random.Random(a.seed)
    print(f"same-process seed={a.seed}", flush=True)
    path = a.path
    with torch_lmdb.LMDBWriter(path, map_size=64 << 10) as w:
        for i in range(500):
            w.write(storm_sample(i))
    del w
    stop = threading.Event()
    errors = []
    lock = threading.Lock()
    w = None
    if a.writer_first:  # the datasets then open a path the writer holds
        w = torch_lmdb.LMDBWriter(path, mode="a", map_size=64 << 10, commit_every=64)
    datasets = [torch_lmdb.LMDBDataset(path, verify=True)]
    reads = [0]

    def reader(ds, tseed):
        r = random.Random(tseed)
        try:
            while not stop.is_set():
                n = len(ds)
                idx = [r.randrange(n) for _ in range(r.randrange(1, 48))]
                check_batch(idx, ds.get_batch(idx))
                with lock:
                    reads[0] += 1
        except BaseException as e:  # noqa: BLE001
            with lock:
                errors.append(f"reader thread: {describe(e)}\n{traceback.format_exc()}")
            stop.set()

    threads = [threading.Thread(target=reader, args=(datasets[0], rng.randrange(2**31))) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        if w is None:
            w = torch_lmdb.LMDBWriter(path, mode="a", map_size=64 << 10, commit_every=64)
        datasets.append(torch_lmdb.LMDBDataset(path, verify=True))  # opened while the writer is open
        t = threading.Thread(target=reader, args=(datasets[1], rng.randrange(2**31)))
        t.start()
        threads.append(t)
        total = len(w)
        for chunk in range(12):
            for _ in range(rng.randrange(200, 800)):
                w.write(storm_sample(total))
                total += 1
            w.flush()
            for ds in datasets:
                ds.refresh()
                if len(ds) != total:
                    raise AssertionError(f"after flush and refresh: len(ds) = {len(ds)}, {total} committed")
            idx = list(range(total - 100, total))
            check_batch(idx, datasets[0].get_batch(idx))
            if stop.is_set():
                break
        w.close()
        late = torch_lmdb.LMDBDataset(path, verify=True)
        for ds in datasets + [late]:
            ds.refresh()
            if len(ds) != total:
                raise AssertionError(f"after close and refresh: len(ds) = {len(ds)}, {total} written")
        for i in range(total):
            check_sample(i, late[i])
    except BaseException as e:  # noqa: BLE001
        with lock:
            errors.append(f"main thread: {describe(e)}\n{traceback.format_exc()}")
    stop.set()
    for t in threads:
        t.join()
    for p in errors:
        print("PROBLEM " + p, flush=True)
    result(reads=reads[0], errors=errors)
    return 1 if errors else 0


# -- 4. reader table ------------------------------------------------------------
def cmd_hold(a) -> int:
    """Takes a reader slot (opens, reads), says READY, then waits to be killed."""
    ds = torch_lmdb.LMDBDataset(a.path, max_readers=a.max_readers)
    check_sample(0, ds[0])
    print("READY", flush=True)
    time.sleep(a.max_seconds)
    return 0


def cmd_probe(a) -> int:
    """Opens and reads once; reports ok or the exception."""
    try:
        ds = torch_lmdb.LMDBDataset(a.path, max_readers=a.max_readers)
        check_sample(0, ds[0])
        result(ok=True)
    except Exception as e:  # noqa: BLE001
        result(ok=False, type=type(e).__name__, message=str(e),
               readers_full=isinstance(e, torch_lmdb.ReadersFullError))
    return 0


# -- 5. full disk -------------------------------------------------------------------
def cmd_fill(a) -> int:
    """Appends until the disk is full; reports the error and what was written."""
    written = 0
    error = None
    w = None
    try:
        w = torch_lmdb.LMDBWriter(a.path, mode="a", commit_every=a.commit_every)
        start = len(w)
        for i in range(start, start + a.limit):
            w.write(storm_sample(i))
            written = i + 1
        w.close()
    except Exception as e:  # noqa: BLE001
        error = {"type": type(e).__name__, "message": str(e), "oserror": isinstance(e, OSError),
                 "torch_lmdb_error": isinstance(e, torch_lmdb.Error)}
    if w is not None and error is not None:
        try:
            w.abandon()
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass
    result(written=written, error=error)
    return 0


def cmd_create(a) -> int:
    """Creates a new database (on a full disk: reports the error)."""
    try:
        with torch_lmdb.LMDBWriter(a.path) as w:
            w.write(storm_sample(0))
        result(error=None)
    except Exception as e:  # noqa: BLE001
        result(error={"type": type(e).__name__, "message": str(e), "oserror": isinstance(e, OSError),
                      "torch_lmdb_error": isinstance(e, torch_lmdb.Error)})
    return 0


def cmd_check(a) -> int:
    """Verifies every sample exactly; reports the count."""
    ds = torch_lmdb.LMDBDataset(a.path, verify=True)
    for i in range(len(ds)):
        check_sample(i, ds[i])
    result(n=len(ds), complete=bool(ds.metadata.get("complete")))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("kill-storm")
    s.add_argument("path")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--kills", type=int, default=50)
    s = sub.add_parser("write-growing")
    s.add_argument("path")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--growths", type=int, default=20)
    s.add_argument("--min-sessions", type=int, default=1)
    s.add_argument("--per-session", type=int, default=2500)
    s.add_argument("--initial", action="store_true", help="one session only")
    s = sub.add_parser("threaded-readers")
    s.add_argument("path")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--stop-file", required=True)
    s.add_argument("--max-seconds", type=float, default=150)
    s = sub.add_parser("same-process")
    s.add_argument("path")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--writer-first", action="store_true", help="open the writer before any dataset")
    for name in ("hold", "probe"):
        s = sub.add_parser(name)
        s.add_argument("path")
        s.add_argument("--max-readers", type=int, required=True)
        s.add_argument("--max-seconds", type=float, default=120)
    s = sub.add_parser("fill")
    s.add_argument("path")
    s.add_argument("--commit-every", type=int, default=50)
    s.add_argument("--limit", type=int, default=10**7)
    s = sub.add_parser("create")
    s.add_argument("path")
    s = sub.add_parser("check")
    s.add_argument("path")
    a = p.parse_args()
    return {"kill-storm": cmd_kill_storm, "write-growing": cmd_write_growing,
            "threaded-readers": cmd_threaded_readers, "same-process": cmd_same_process,
            "hold": cmd_hold, "probe": cmd_probe, "fill": cmd_fill, "create": cmd_create,
            "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

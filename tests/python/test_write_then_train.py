"""Write with Dask, then train with worker processes, in one process (a
notebook's order): README "Shard directories and Dask"."""
import gc
import os
import subprocess
import sys

from torch_lmdb import dataset as _dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# write_shards on its own LocalCluster, then epochs of make_loader with 2
# forked workers each. Iterators left mid-epoch in reference cycles (as a
# traceback or a notebook's output history keeps them) are garbage the workers
# inherit; each worker collects its garbage as it starts (worker_init_fn), as
# Python's collector may at any allocation.
SCRIPT = r"""
import gc, sys, threading
sys.path.insert(0, sys.argv[1])
import numpy as np
import dask.bag as db
import torch_lmdb
from torch_lmdb.dask import write_shards


def simulate(i):
    return {"i": i, "x": np.full((2, 3), i, dtype=np.float32)}


if __name__ == "__main__":
    out = sys.argv[2]
    write_shards(db.from_sequence(range(300), npartitions=3).map(simulate), out)
    # Its cluster's profiler thread does not outlive it (Dask's event loop thread does).
    assert "Profile" not in [t.name for t in threading.enumerate()]
    ds = torch_lmdb.LMDBDataset(out)
    for epoch in range(4):
        def loader():
            return torch_lmdb.make_loader(ds, 16, shuffle=True, seed=0, num_workers=2, timeout=60,
                                          worker_init_fn=lambda _: gc.collect())
        left = iter(loader())
        next(left)
        cycle = [left]
        cycle.append(cycle)
        del left, cycle
        seen = sorted(i for batch in loader() for i in batch["i"].tolist())
        assert seen == list(range(300)), seen
        print("epoch", epoch, "ok", flush=True)
"""


def test_write_shards_then_train_with_workers_in_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, str(tmp_path / "sim")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" ok") == 4
    # No worker ran a finalizer of its parent's objects (it shut down the parent's workers).
    assert "can only test a child process" not in proc.stderr, proc.stderr[-4000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-4000:]


def test_forks_in_flight_on_two_threads_leave_the_collector_as_it_was():
    # The collector is off while any fork is in flight (see dataset.py); two
    # threads' forks interleaving their at-fork handlers restore it once both
    # are out, and a collector the program turned off stays off.
    assert gc.isenabled()
    _dataset._before_fork()
    _dataset._before_fork()
    assert not gc.isenabled()
    _dataset._after_fork_in_parent()
    assert not gc.isenabled()  # (the other fork is still in flight)
    _dataset._after_fork_in_parent()
    assert gc.isenabled()
    gc.disable()
    try:
        _dataset._before_fork()
        _dataset._after_fork_in_parent()
        assert not gc.isenabled()
    finally:
        gc.enable()
    # A real fork: the child collects as usual, the parent too.
    pid = os.fork()
    if pid == 0:
        os._exit(0 if gc.isenabled() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert gc.isenabled()

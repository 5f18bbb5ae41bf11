"""make_loader and iter_batches across ranks and epochs, and exact mid-epoch
resumption (also in a new process, and on another world size)."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import torch_lmdb

N = 203  # not a multiple of any batch size below: the remainder rule is exercised
HERE = os.path.dirname(os.path.abspath(__file__))


def ids(batches):
    return [i for b in batches for i in b["index"].tolist()]


def digest(id_list):
    return hashlib.sha256(json.dumps(id_list).encode()).hexdigest()


def take(loader, k):
    """The ids of the first k batches of a new iteration, and the state after them."""
    got = []
    for batch in loader:
        got.append(batch["index"].tolist())
        if len(got) == k:
            return got, loader.state_dict()
    return got, loader.state_dict()


# A new process resumes each saved state and prints the hash of the ids it reads.
RESUME = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
import torch_lmdb
path, jobs = sys.argv[2], json.loads(sys.stdin.read())
ds = torch_lmdb.LMDBDataset(path)
out = []
for job in jobs:
    if job["kind"] == "loader":
        loader = torch_lmdb.make_loader(ds, 16, shuffle=True, seed=12345, num_workers=job["workers"])
        loader.load_state_dict(job["state"])
        batches = list(loader)
    else:
        it = ds.iter_batches(16, shuffle=True, seed=1, threads=2)
        it.load_state_dict(job["state"])
        batches = list(it)
    got = [i for b in batches for i in b["index"].tolist()]
    out.append({"ids": got, "len": len(batches)})
print(json.dumps(out))
"""


def test_resume_in_a_new_process_continues_the_identical_stream(make_db):
    path = make_db(N)
    ds = torch_lmdb.LMDBDataset(path)
    jobs, want = [], []
    for workers in (0, 2):
        whole = torch_lmdb.make_loader(ds, 16, shuffle=True, seed=12345, num_workers=workers)
        whole.set_epoch(3)
        full = [b["index"].tolist() for b in whole]
        assert sorted(i for b in full for i in b) == list(range(N))
        for k in (1, 6, 12):
            extra = dict(prefetch_factor=4) if workers else {}  # workers read well ahead of the loop
            part = torch_lmdb.make_loader(ds, 16, shuffle=True, seed=12345, num_workers=workers, **extra)
            part.set_epoch(3)
            got, state = take(part, k)
            assert got == full[:k]
            assert state["epoch"] == 3 and state["position"] == 16 * k
            json.dumps(state)  # JSON-able
            jobs.append({"kind": "loader", "workers": workers, "state": state})
            want.append(full[k:])
    stream = ds.iter_batches(16, shuffle=True, seed=1, threads=2, epoch=2)
    full = [b["index"].tolist() for b in stream]
    for k in (2, 9):
        it = ds.iter_batches(16, shuffle=True, seed=1, threads=2, epoch=2)
        got = [next(it)["index"].tolist() for _ in range(k)]
        assert got == full[:k]
        jobs.append({"kind": "stream", "state": it.state_dict()})
        want.append(full[k:])
    root = os.path.dirname(os.path.dirname(HERE))
    run = subprocess.run([sys.executable, "-c", RESUME, root, path], input=json.dumps(jobs), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for job, result, rest in zip(jobs, results, want):
        assert digest(result["ids"]) == digest([i for b in rest for i in b]), job
        assert result["len"] == len(rest)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_partition_each_epoch_with_equal_batch_counts(make_db, world, drop_last):
    ds = torch_lmdb.LMDBDataset(make_db(N))
    per_rank = []
    for rank in range(world):
        loader = torch_lmdb.make_loader(ds, 16, shuffle=True, seed=7, rank=rank, world_size=world,
                                        drop_last=drop_last)
        loader.set_epoch(1)
        per_rank.append(list(loader))
        # iter_batches splits the same way.
        assert ids(ds.iter_batches(16, shuffle=True, seed=7, epoch=1, rank=rank, world_size=world,
                                   drop_last=drop_last)) == ids(per_rank[-1])
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, counts  # equal batch counts
    seen = [i for batches in per_rank for i in ids(batches)]
    if drop_last:
        full_steps = N // (16 * world)
        assert len(seen) == full_steps * 16 * world == len(set(seen))
    else:
        assert sorted(seen) == list(range(N))  # every sample exactly once over all ranks


def test_tail_smaller_than_the_world_repeats_the_order_start(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(33))  # 32 in two full steps of 2 x 8, a tail of 1 for 2 ranks
    loaders = [torch_lmdb.make_loader(ds, 8, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [3, 3]
    assert [len(b[-1]["label"]) for b in batches] == [1, 1]
    first_of_order = batches[0][0]["index"][0].item()
    assert batches[1][-1]["index"].tolist() == [first_of_order]
    assert sorted(set(ids(batches[0]) + ids(batches[1]))) == list(range(33))


@pytest.mark.parametrize("new_world", [1, 3])
def test_elastic_resume_sees_every_remaining_sample_once(make_db, new_world):
    ds = torch_lmdb.LMDBDataset(make_db(N))
    seen, states = [], []
    for rank in range(2):  # two ranks in step, 5 batches each
        loader = torch_lmdb.make_loader(ds, 10, shuffle=True, seed=99, rank=rank, world_size=2, num_workers=0)
        loader.set_epoch(4)
        got, state = take(loader, 5)
        seen += [i for b in got for i in b]
        states.append(state)
    assert states[0] == states[1]  # the run's state is any rank's
    assert states[0]["position"] == 100 and states[0]["world_size"] == 2
    rest, counts = [], set()
    for rank in range(new_world):
        loader = torch_lmdb.make_loader(ds, 10, shuffle=True, seed=99, rank=rank, world_size=new_world)
        loader.load_state_dict(states[0])
        batches = list(loader)
        counts.add(len(batches))
        rest += ids(batches)
        assert loader.epoch == 5  # finished epoch 4
    assert len(counts) == 1
    assert len(rest) == len(set(rest)) == N - 100
    assert sorted(seen + rest) == list(range(N))
    # iter_batches streams resume elastically the same way.
    streamed = []
    for rank in range(new_world):
        it = ds.iter_batches(10, shuffle=True, seed=0, rank=rank, world_size=new_world)
        it.load_state_dict(states[0])
        streamed += ids(it)
    assert sorted(streamed) == sorted(rest)


def test_set_epoch_changes_the_order_deterministically(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(N))
    a = torch_lmdb.make_loader(ds, 32, shuffle=True, seed=5)
    b = torch_lmdb.make_loader(ds, 32, shuffle=True, seed=5)
    epochs = [ids(a) for _ in range(3)]  # epochs advance by themselves
    assert a.epoch == 3
    assert len({digest(e) for e in epochs}) == 3
    for e in (2, 0, 1):
        b.set_epoch(e)
        assert ids(b) == epochs[e]
    assert ids(ds.iter_batches(32, shuffle=True, seed=5, epoch=1)) == epochs[1]  # the same orders
    assert ids(torch_lmdb.make_loader(ds, 32, shuffle=True, seed=6)) != epochs[0]


def test_without_a_seed_shuffle_still_changes_each_epoch(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(100))
    torch.manual_seed(0)
    a = torch_lmdb.make_loader(ds, 10, shuffle=True)
    first, second = ids(a), ids(a)
    assert first != second and sorted(first) == list(range(100))
    torch.manual_seed(0)
    assert ids(torch_lmdb.make_loader(ds, 10, shuffle=True)) == first  # torch.manual_seed repeats it
    g = torch.Generator().manual_seed(3)
    assert ids(torch_lmdb.make_loader(ds, 10, shuffle=True, generator=g)) != first
    seq = torch_lmdb.make_loader(ds, 30)
    assert ids(seq) == list(range(100)) and len(seq) == 4


def test_state_at_epoch_end_and_bad_states(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(50))
    loader = torch_lmdb.make_loader(ds, 16, shuffle=True, seed=1)
    assert loader.state_dict()["position"] == 0 and len(loader) == 4
    for k, _ in enumerate(loader, 1):
        if k == 4:
            assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    state = loader.state_dict()
    state_short = dict(state, num_samples=49)
    with pytest.raises(ValueError, match="49 samples"):
        loader.load_state_dict(state_short)
    with pytest.raises(ValueError, match="order"):
        torch_lmdb.make_loader(ds, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict(dict(state, position=51))
    with pytest.raises(ValueError, match="rank"):
        torch_lmdb.make_loader(ds, 16, rank=2, world_size=2)
    # A resumed loader's len() counts the batches left.
    loader.load_state_dict(dict(state, position=32))
    assert len(loader) == 2 and len(ids(loader)) == 18


def test_a_dropped_loader_goes_at_once(make_db):
    # No reference cycle: persistent workers (and the batch buffers they map) end with the loader.
    import gc
    import weakref

    ds = torch_lmdb.LMDBDataset(make_db(40))
    gc.disable()
    try:
        loader = torch_lmdb.make_loader(ds, 8, shuffle=True, num_workers=1, persistent_workers=True)
        assert len(ids(loader)) == 40
        ref = weakref.ref(loader)
        del loader
        assert ref() is None
    finally:
        gc.enable()


# README "Exact mid-epoch resumption", run as written: a run that stops
# mid-epoch, then the same code again, trains every sample of each epoch once.
README_N = 300  # 64 a batch: 4 full batches and a tail of 44 (2 ranks: 2 steps of 128, a tail of 22 each)


class _Crash(Exception):
    pass


def _run_readme_resume(ds, epochs, crash_at=None, before_step=None):
    """Runs the README's resume snippet in the current directory; returns the
    batches (lists of ids) train_step saw, stopping at call ``crash_at``."""
    from _readme import snippet

    seen = []

    def train_step(batch):
        if before_step is not None:
            before_step()
        if len(seen) == crash_at:
            raise _Crash
        seen.append(batch["index"].tolist())

    scope = dict(os=os, torch=torch, torch_lmdb=torch_lmdb, ds=ds, epochs=epochs, train_step=train_step)
    try:
        exec(snippet("Exact mid-epoch resumption"), scope)
    except _Crash:
        pass
    return seen


def test_readme_resume_loop_continues_the_epoch_it_stopped_in(make_db, tmp_path, monkeypatch):
    ds = torch_lmdb.LMDBDataset(make_db(README_N))
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "whole").mkdir()
    (tmp_path / "stopped").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    whole = _run_readme_resume(ds, 2)
    assert len(whole) == 10 and sorted(ids_of(whole[:5])) == list(range(README_N))
    monkeypatch.chdir(tmp_path / "stopped")
    first = _run_readme_resume(ds, 2, crash_at=3)  # saved after batch 3, stopped in batch 4
    assert torch.load("ckpt.pt")["loader"]["position"] == 3 * 64
    second = _run_readme_resume(ds, 2)
    assert first + second == whole  # epoch 0 continued at 192: nothing replayed, nothing skipped


def ids_of(batches):
    return [i for b in batches for i in b]


README_RANK = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import torch.distributed as dist
import torch_lmdb
from test_loader_resume import _run_readme_resume
path, store, crash_at = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
# A file store: no port and no TCPStore, whose libuv backend Debian's torch 2.6 lacks.
dist.init_process_group("gloo", init_method="file://" + store, rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]))
# train_step syncs the ranks as DDP's gradient all-reduce does (rank 0 saves
# after every step, so no rank loads a checkpoint being written).
seen = _run_readme_resume(torch_lmdb.LMDBDataset(path), 2, crash_at, before_step=dist.barrier)
print("SEEN " + json.dumps(seen), flush=True)
"""


def _readme_resume_on_ranks(path, cwd, world, crash_at=None):
    root = os.path.dirname(os.path.dirname(HERE))
    store = tempfile.mktemp(prefix="rendezvous-", dir=cwd)  # a new store for each run of the ranks
    procs = [subprocess.Popen([sys.executable, "-c", README_RANK, root, HERE, path, store, json.dumps(crash_at)],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), OMP_NUM_THREADS="1"))
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    return [json.loads(out.split("SEEN ")[-1]) for out, _ in outs]


def test_readme_resume_loop_on_two_ranks(make_db, tmp_path):
    path = make_db(README_N)
    (tmp_path / "whole").mkdir()
    (tmp_path / "stopped").mkdir()
    whole = _readme_resume_on_ranks(path, str(tmp_path / "whole"), 2)
    assert [len(w) for w in whole] == [6, 6]  # 3 batches a rank and epoch
    assert sorted(ids_of(whole[0][:3]) + ids_of(whole[1][:3])) == list(range(README_N))
    first = _readme_resume_on_ranks(path, str(tmp_path / "stopped"), 2, crash_at=2)
    assert torch.load(str(tmp_path / "stopped" / "ckpt.pt"))["loader"]["position"] == 2 * 128
    second = _readme_resume_on_ranks(path, str(tmp_path / "stopped"), 2)
    for rank in range(2):
        assert first[rank] + second[rank] == whole[rank], rank


BAD_STATE_VALUES = [
    ("position", "320"), ("position", None), ("position", True), ("position", 32.0), ("position", 5.9),
    ("position", -1), ("position", 51),
    ("seed", "abc"), ("seed", -1), ("seed", 2**80), ("seed", 0.5), ("seed", None),
    ("epoch", 2**64), ("epoch", -1), ("epoch", 5.9), ("epoch", True), ("epoch", "1"),
    ("num_samples", 50.0), ("num_samples", "50"),
    ("order", 3),
    ("batch_size", 0), ("batch_size", "16"), ("world_size", 0), ("world_size", 1.5),
]


@pytest.mark.parametrize("kind", ["loader", "stream"])
def test_load_state_dict_checks_every_key(make_db, kind):
    ds = torch_lmdb.LMDBDataset(make_db(50))
    make = {"loader": lambda: torch_lmdb.make_loader(ds, 16, shuffle=True, seed=1),
            "stream": lambda: ds.iter_batches(16, shuffle=True, seed=1)}[kind]
    good = make().state_dict()
    for key, value in BAD_STATE_VALUES:
        target = make()
        with pytest.raises(ValueError, match=f"'{key}'"):
            target.load_state_dict(dict(good, **{key: value}))
        assert ids(target) == ids(make()), (key, value)  # a refused state changes nothing
    for key in ("seed", "epoch", "position", "num_samples"):
        with pytest.raises(ValueError, match=f"'{key}'"):
            make().load_state_dict({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="state"):
        make().load_state_dict([("seed", 1)])
    # The largest values in range are taken.
    edge = make()
    edge.load_state_dict(dict(good, seed=2**64 - 1, epoch=2**63 - 1, position=50))
    assert ids(edge) == []

"""What depends on the installed stack: torch 2.x dtypes, thread lifetime, the pip install."""
import json
import os
import subprocess
import sys
import shutil
import textwrap

import lmdb
import numpy as np
import pytest
import torch

import torch_lmdb
from conftest import restamp_layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every dtype the format names (docs/FORMAT.md) with the first torch release that has it.
FORMAT_DTYPES = {
    "bool": "1.0", "uint8": "1.0", "int8": "1.0", "int16": "1.0", "int32": "1.0", "int64": "1.0",
    "float16": "1.0", "bfloat16": "1.0", "float32": "1.0", "float64": "1.0", "complex64": "1.0",
    "complex128": "1.0", "complex32": "1.13", "uint16": "2.3", "uint32": "2.3", "uint64": "2.3",
    "float8_e5m2": "2.1", "float8_e4m3fn": "2.1", "float8_e5m2fnuz": "2.2", "float8_e4m3fnuz": "2.2",
}
PRESENT = [name for name in FORMAT_DTYPES if isinstance(getattr(torch, name, None), torch.dtype)]
MISSING = [name for name in FORMAT_DTYPES if name not in PRESENT]
TORCH = ".".join(torch.__version__.split(".")[:2])


def as_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes (float8 and unsigned dtypes lack comparison kernels in torch 2.x)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def pattern(shape, dtype: torch.dtype) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    raw = (torch.arange(n * torch.empty((), dtype=dtype).element_size(), dtype=torch.int64) * 37 % 251).to(torch.uint8)
    if dtype == torch.bool:
        return (raw[:n] % 2 == 1).reshape(shape)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", PRESENT)
def test_every_dtype_of_this_torch_round_trips(tmp_path, name):
    dtype = getattr(torch, name)
    path = str(tmp_path / "db")
    samples = [{"scalar": pattern((), dtype), "m": pattern((3, 5), dtype), "empty": pattern((0, 2), dtype)}
               for _ in range(3)]
    with torch_lmdb.LMDBWriter(path) as w:
        w.write_many(samples)
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert {f["name"]: f["dtype"] for f in ds.schema} == {"scalar": name, "m": name, "empty": name}
    for i, want in enumerate(samples):
        got = ds[i]
        for field, value in want.items():
            assert got[field].dtype == dtype and got[field].shape == value.shape
            assert as_bytes(got[field]) == as_bytes(value), field
    batch = ds.get_batch([2, 0])
    assert batch["m"].dtype == dtype and batch["m"].shape == (2, 3, 5)
    assert as_bytes(batch["m"]) == as_bytes(samples[2]["m"]) + as_bytes(samples[0]["m"])


@pytest.mark.skipif(not hasattr(torch, "uint16"), reason=f"torch {torch.__version__} has no uint16/32/64")
def test_numpy_unsigned_arrays_keep_their_dtype(tmp_path):
    path = str(tmp_path / "db")
    values = {"u16": np.array([0, 65535], np.uint16), "u32": np.array([2**32 - 1], np.uint32),
              "u64": np.array([2**64 - 1], np.uint64)}
    with torch_lmdb.LMDBWriter(path) as w:
        w.write(values)
    got = torch_lmdb.LMDBDataset(path)[0]
    for name, value in values.items():
        assert got[name].dtype == getattr(torch, value.dtype.name)
        assert got[name].numpy().tolist() == value.tolist()


def relabel(path: str, field: str, dtype_name: str) -> None:
    """Rewrites the schema's dtype of `field` with py-lmdb (a database some other torch wrote)."""
    env = lmdb.open(path, max_dbs=4)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        schema = json.loads(txn.get(b"schema", db=meta))
        for f in schema:
            if f["name"] == field:
                f["dtype"] = dtype_name
        txn.put(b"schema", json.dumps(schema).encode(), db=meta)
        restamp_layout(txn, meta)  # as the other writer would have
    env.close()


@pytest.mark.parametrize("name", MISSING or [None])
def test_a_dtype_this_torch_lacks_is_refused_at_open_naming_field_and_dtype(tmp_path, name):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write({"a": np.zeros(2, np.int16), "pixels": np.zeros(2, np.int16)})
    if name is None:
        # This torch has every dtype the format names: a schema naming the newest
        # of them opens (the refusal is only for what this torch lacks).
        relabel(path, "pixels", "uint16")
        assert len(torch_lmdb.LMDBDataset(path)) == 1
        return
    relabel(path, "pixels", name)
    with pytest.raises(torch_lmdb.InvalidDatabaseError) as e:
        torch_lmdb.LMDBDataset(path)
    assert f"field 'pixels' has dtype {name}, which this torch ({TORCH}) lacks" in str(e.value)
    assert f"torch >= {FORMAT_DTYPES[name]}" in str(e.value) and path in str(e.value)


def test_a_dtype_the_format_does_not_name_is_refused_at_open(tmp_path):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write({"pixels": np.zeros(2, np.int16)})
    relabel(path, "pixels", "float4_e2m1")
    with pytest.raises(torch_lmdb.InvalidDatabaseError, match="field 'pixels' has dtype 'float4_e2m1', which "
                                                               "torch_lmdb's format does not name"):
        torch_lmdb.LMDBDataset(path)


THREADS_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)          # torch's own intra-op pool: not torch_lmdb's threads
    import torch_lmdb

    def threads(settle=False):
        # A joined thread can still be listed for a moment: pthread_join returns
        # when the kernel clears the thread's tid, before it leaves /proc. A
        # thread that leaked stays; one that is leaving goes within the deadline.
        deadline = time.monotonic() + (5.0 if settle else 0.0)
        while True:
            now = sorted(os.listdir("/proc/self/task"))
            if not settle or now == out["start"] or time.monotonic() > deadline:
                return now
            time.sleep(0.01)

    path = sys.argv[1]
    out = {"start": threads()}
    w = torch_lmdb.LMDBWriter(path, commit_every=16)
    for i in range(300):
        w.write({"x": np.full(256, i, np.float32), "name": str(i)})
    w.close()
    out["after_close"] = threads(settle=True)
    with torch_lmdb.LMDBWriter(path, mode="a", commit_every=16) as w:
        w.write_many({"x": np.full(256, i, np.float32), "name": str(i)} for i in range(300, 400))
    out["after_with"] = threads(settle=True)
    ds = torch_lmdb.LMDBDataset(path)
    epoch = ds.iter_batches(8, threads=3, batches_ahead=4, shuffle=True, seed=1)
    seen = [next(epoch)]
    out["during_epoch"] = threads()
    seen += list(epoch)
    out["after_epoch"] = threads(settle=True)
    out["samples"] = sum(len(b["name"]) for b in seen)
    epoch = ds.iter_batches(8, threads=3)
    next(epoch)
    del epoch                          # leaving an epoch early
    out["after_break"] = threads(settle=True)
    print(json.dumps(out))
""")


def test_no_thread_of_ours_outlives_its_call(tmp_path):
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(tmp_path / "db")], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["samples"] == 400
    assert len(got["during_epoch"]) > len(got["start"])  # the count sees the epoch's reader threads
    for when in ("after_close", "after_with", "after_epoch", "after_break"):
        assert got[when] == got["start"], f"{when}: threads {got[when]}, at the start {got['start']}"


def _version_h() -> str:
    with open(os.path.join(ROOT, "csrc", "torch_lmdb", "version.h")) as f:
        return f.read().split('TORCH_LMDB_VERSION "')[1].split('"')[0]


def test_pip_install_into_a_venv_with_system_site_packages(tmp_path):
    """`pip install --no-build-isolation .` from a copy of the tree; the installed package
    (not the tree's in-place build) imports, writes and reads, and the console script runs."""
    # The copy has a fixed path under build/ so that ccache (if installed) finds its objects again.
    src = os.path.join(ROOT, "build", "pip-install-src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.so", "*.egg-info", "__pycache__", ".pytest_cache", "*_out", "bench_full"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if os.path.isdir("/usr/lib/ccache"):  # Debian's ccache masquerade: c++ -> ccache c++
        # Paths relative to the copy, as `make python-build` has them relative to the tree
        # (both build two levels below their root): its objects are found again.
        env.update(PATH="/usr/lib/ccache:" + env.get("PATH", ""), CCACHE_BASEDIR=src, CCACHE_NOHASHDIR="1")
    pip = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-q",
                          src], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert pip.returncode == 0, pip.stdout + pip.stderr
    check = textwrap.dedent("""
        import sys, torch_lmdb
        print(torch_lmdb.__file__)
        print(torch_lmdb.__version__)
        with torch_lmdb.LMDBWriter(sys.argv[1]) as w:
            w.write({"x": 3})
        print(int(torch_lmdb.LMDBDataset(sys.argv[1])[0]["x"]))
    """)
    run = subprocess.run([py, "-c", check, str(tmp_path / "db")], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    where, version, value = run.stdout.split()
    assert where.startswith(str(venv)) and version == _version_h() and value == "3"
    script = subprocess.run([str(venv / "bin" / "torch-lmdb"), "info", str(tmp_path / "db")], capture_output=True,
                            text=True, env=env, cwd=str(tmp_path))
    assert script.returncode == 0 and "samples:        1" in script.stdout, script.stderr

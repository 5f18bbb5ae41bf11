"""Tests that catch what they claim to (issue 25, part D, item 13).

Each section pins one rule that a one-line change used to break without any
test noticing; the docstring of each test names the line it guards. Whatever
could crash (SIGBUS from a file shrunk under its map, a division by a page
size) runs in a subprocess whose exit status is asserted; whatever could hang
has a timeout.
"""
import ctypes
import json
import mmap
import os
import selectors
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import torch_lmdb
from torch_lmdb import _manifest
from conftest import sample
from test_cold import _evict
from test_compression import parse_fields, read_record

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PAGE = 4096


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def _status(rc: int) -> str:
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"


def run_script(script: str, *args, timeout: float = 120):
    """Runs ``script`` in a fresh interpreter; returns (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    return p.returncode, p.stdout, p.stderr


# -- a writer killed by SIGKILL at a point it announces ----------------------------
_OPEN_WRITE_AND_WAIT = r"""
import sys, time
import torch_lmdb
from conftest import sample
from test_cold import _evict
from test_compression import parse_fields, read_record
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = torch_lmdb.LMDBWriter(path, mode=mode)
first = len(w)
for i in range(first, first + n):
    w.write(sample(i))
if n:
    w.flush()
print("ready", len(w), flush=True)
time.sleep(600)
"""


def kill_writer_when_ready(path: str, mode: str = "w", write: int = 0, timeout: float = 120) -> int:
    """A writer process opens ``path`` (``mode``), writes and flushes ``write``
    samples, prints 'ready' and sleeps; it is SIGKILLed as soon as it is
    ready (before it could close). Returns its len() when it was killed."""
    p = subprocess.Popen([sys.executable, "-c", _OPEN_WRITE_AND_WAIT, path, mode, str(write)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        line = p.stdout.readline() if sel.select(timeout=timeout) else ""
        if not line.startswith("ready"):
            p.kill()
            _, err = p.communicate(timeout=timeout)
            pytest.fail(f"the writer process did not get ready ({_status(p.returncode)}): {line!r}\n{err[-3000:]}")
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=timeout)
        assert p.returncode == -signal.SIGKILL, _status(p.returncode)
        return int(line.split()[1])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


# -- 13a: a shard whose writer died is never recorded in a manifest ------------------
def test_shard_of_a_killed_writer_is_not_recorded(tmp_path):
    """_manifest.shard_record refuses a shard whose metadata says complete=false
    (its writer died), and write_manifest then writes no manifest. Guards the
    ``if not meta.get("complete", False)`` check of shard_record."""
    out = str(tmp_path / "out")
    good = _manifest.write_shard(out, 0, (sample(i) for i in range(4)))
    dead = os.path.join(out, _manifest.shard_name(1))
    assert kill_writer_when_ready(dead, write=3) == 3
    assert torch_lmdb.info(dead)["complete"] is False  # (the premise: a dead writer's shard)
    with pytest.raises(_manifest.ManifestError, match="incomplete") as e:
        _manifest.shard_record(dead)
    assert dead in str(e.value)
    record = dict(good, path=_manifest.shard_name(1))  # what a caller would have recorded for it
    with pytest.raises(_manifest.ManifestError, match="incomplete"):
        _manifest.write_manifest(out, [good, record])
    assert not os.path.exists(os.path.join(out, _manifest.MANIFEST_NAME))


def test_shard_abandoned_by_its_writer_is_not_recorded(tmp_path):
    """The same for a writer that stopped without close() (abandon(): what an
    exception in the middle of a shard leaves)."""
    out = str(tmp_path / "out")
    path = os.path.join(out, _manifest.shard_name(0))
    w = torch_lmdb.LMDBWriter(path)
    for i in range(3):
        w.write(sample(i))
    w.abandon()
    with pytest.raises(_manifest.ManifestError, match=f"shard '{path}' is incomplete"):
        _manifest.shard_record(path)


# -- 13b: a manifest of another format version is refused --------------------------
def _shard_dir(tmp_path) -> str:
    out = str(tmp_path / "out")
    records = [_manifest.write_shard(out, k, (sample(i) for i in range(3 * k, 3 * k + 3))) for k in range(2)]
    _manifest.write_manifest(out, records)
    return out


def _set_manifest_version(out: str, version) -> str:
    path = os.path.join(out, _manifest.MANIFEST_NAME)
    with open(path) as f:
        m = json.load(f)
    if version is None:
        del m["format_version"]
    else:
        m["format_version"] = version
    with open(path, "w") as f:
        json.dump(m, f)
    return path


@pytest.mark.parametrize("version", [0, 3, 99, "1", "2", 1.5, None], ids=lambda v: f"version-{v!r}")
def test_manifest_of_an_unknown_format_version_is_refused(tmp_path, version):
    """read_manifest (Python: `torch-lmdb info`/`verify`) and the C++ Reader
    (LMDBDataset) both refuse a manifest whose format_version is not 1 or 2:
    a missing one, another number, a string. read_manifest calls the C++
    checks (one implementation); both paths are asserted."""
    out = _shard_dir(tmp_path)
    assert _manifest.read_manifest(out)["format_version"] == 2
    assert len(torch_lmdb.LMDBDataset(out)) == 6
    manifest_path = _set_manifest_version(out, version)
    with pytest.raises(_manifest.ManifestError, match="format.version") as e:
        _manifest.read_manifest(out)
    assert manifest_path in str(e.value)
    with pytest.raises(torch_lmdb.Error) as e:
        torch_lmdb.LMDBDataset(out)
    assert "manifest.json" in str(e.value) and "version" in str(e.value), str(e.value)


# -- 13c: a writer killed before its first commit leaves the database incomplete ---
def test_new_database_killed_before_its_first_commit_is_incomplete(tmp_path):
    """Writer::Writer marks the database incomplete (complete=false, 0
    samples) in its own commit before the first sample; a writer killed right
    after it opened leaves a database that reads as incomplete and empty."""
    path = str(tmp_path / "db")
    assert kill_writer_when_ready(path, "w", write=0) == 0
    with pytest.warns(RuntimeWarning, match="incomplete"):  # (once per process)
        info = torch_lmdb.info(path)
    assert info["complete"] is False and info["num_samples"] == 0, info
    ds = torch_lmdb.LMDBDataset(path)
    assert len(ds) == 0 and ds.metadata["complete"] is False and ds.metadata["num_samples"] == 0


def test_append_killed_before_its_first_commit_is_incomplete(tmp_path, make_db):
    """The same for mode="a" on a complete database: from the moment the
    appending writer is open, the database no longer claims completeness;
    its samples are intact."""
    path = make_db(5)
    assert torch_lmdb.info(path)["complete"] is True
    assert kill_writer_when_ready(path, "a", write=0) == 5
    with pytest.warns(RuntimeWarning, match="incomplete"):  # (once per process)
        info = torch_lmdb.info(path)
    assert info["complete"] is False and info["num_samples"] == 5, info
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert [ds[i]["label"] for i in range(5)] == [f"item-{i}" for i in range(5)]


# -- 13d: the page requests reach the kernel -----------------------------
WIDE = 16384  # float32 values a sample: 64 KiB, on overflow pages of their own
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


class Residency:
    """Which pages of a file are in the page cache (mincore(2) on a map of
    it that is never touched, so looking loads nothing)."""

    def __init__(self, path: str):
        self.size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = LIBC.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        assert addr not in (None, ctypes.c_void_p(-1).value), f"mmap: {os.strerror(ctypes.get_errno())}"
        self.addr = addr

    def resident(self, pages) -> list:
        """The pages (numbers) of ``pages`` that are cached."""
        n = (self.size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * n)()
        assert LIBC.mincore(self.addr, self.size, vec) == 0, os.strerror(ctypes.get_errno())
        return [p for p in pages if vec[p] & 1]

    def close(self):
        LIBC.munmap(self.addr, self.size)


def _inner_pages(data: bytes, i: int) -> list:
    """The pages lying wholly inside sample i's payload (x = i + 0.5 everywhere),
    without the first and last: no B-tree search or header read touches them."""
    pattern = np.full(WIDE, i + 0.5, dtype=np.float32).tobytes()
    at = data.find(pattern)
    assert at >= 0 and data.find(pattern, at + 1) < 0, f"sample {i}'s payload found {data.count(pattern)} times"
    first, end = (at + PAGE - 1) // PAGE, (at + len(pattern)) // PAGE
    return list(range(first + 1, end - 1))


def test_iter_batches_requests_the_pages_of_the_coming_batch(tmp_path):
    """iter_batches with page_requests="always" requests the pages of the next
    batch (Reader::request_pages -> detail::request_pages -> madvise(MADV_WILLNEED)) before
    it reads the current one. With batches_ahead=1 the reading thread stops after
    batch 0 until next() is called: batch 1 has been requested, not read. Its
    pages must arrive in the page cache; without the madvise call (the
    counters still count) nothing would read them. Pages of later batches,
    requested by nobody, stay out (so readahead of the kernel is not what
    brings batch 1 in)."""
    path = str(tmp_path / "db")
    n, batch = 24, 4
    with torch_lmdb.LMDBWriter(path) as w:
        for i in range(n):
            w.write({"index": i, "x": torch.full((WIDE,), i + 0.5)})
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "rb") as f:
        data = f.read()
    pages = {i: _inner_pages(data, i) for i in range(n)}
    del data
    coming = [p for i in range(batch, 2 * batch) for p in pages[i]]  # batch 1
    later = [p for i in range(4 * batch, n) for p in pages[i]]       # batches 4 and 5
    _evict(path)
    look = Residency(data_file)
    try:
        assert look.resident(coming + later) == [], "could not drop the test file from the page cache"
        # direct_reads off: its batches would read these records through io_uring, unrequested.
        ds = torch_lmdb.LMDBDataset(path, page_requests="always", direct_reads=False)
        assert look.resident(coming) == [], "opening the dataset read the pages of batch 1"
        it = ds.iter_batches(batch, batches_ahead=1, threads=1)
        deadline = time.monotonic() + 10.0  # the reads are asynchronous: wait for them, boundedly
        while look.resident(coming) != coming and time.monotonic() < deadline:
            time.sleep(0.01)
        got = look.resident(coming)
        stats = ds.io_stats()
        assert got == coming, (f"{len(coming) - len(got)} of {len(coming)} pages of the coming batch 1 were "
                               f"not read in 10 s after iter_batches requested them (io_stats {stats})")
        assert stats["request_pages_calls"] >= 1 and stats["pages_requested_ahead"] > 0, stats
        assert look.resident(later) == [], "pages nobody requested were read (kernel readahead?)"
        seen = [b["index"].tolist() for b in it]
        assert seen == [list(range(k, k + batch)) for k in range(0, n, batch)]
    finally:
        look.close()


# -- 13e: a value-index hit is bounds-checked like an mdb_get result ----------------
_STALE_INDEX = r"""
import json, sys
import torch_lmdb
db, replacement, damage = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
def attempt(name, indices):
    try:
        b = ds.get_batch(indices)
        out[name] = {"returned": [float(v) for v in b["x"][:, 0].tolist()]}
    except torch_lmdb.CorruptedError as e:
        out[name] = {"corrupted": str(e)}
    except Exception as e:
        out[name] = {"other": f"{type(e).__name__}: {e}"}
    print(json.dumps({name: out[name]}), flush=True)
ds = torch_lmdb.LMDBDataset(db, page_requests="never")
attempt("fill", [19, 18])  # the value index of this snapshot now holds 19 and 18
with open(replacement, "rb") as f:
    smaller = f.read()
with open(db + "/data.mdb", "r+b") as f:  # replaced in place, as `cp` does: same inode
    f.truncate(0)
    f.write(smaller)
if damage == "1":
    attempt("damaged", [5])  # found in the B-tree: its value lies past the file
attempt("stale", [19])       # an index hit into the pages the file lost
print("DONE " + json.dumps(out), flush=True)
"""


def _txnid(path: str) -> int:
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def _same_txnid_smaller_database(tmp_path, damaged: bool):
    """(big, small): two databases of 20 samples written with the same number
    of commits (so the same txnid); big's samples are 64 KiB, small's 16
    bytes but sample 5 (8 KiB, on overflow pages). With ``damaged``, sample
    5's leaf node in small claims 64 MiB (a value past the file)."""
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    with torch_lmdb.LMDBWriter(big, commit_every=1000) as w:
        for i in range(20):
            w.write({"x": torch.full((WIDE,), float(i))})
    with torch_lmdb.LMDBWriter(small, commit_every=1000) as w:
        for i in range(20):
            w.write({"x": torch.full((2048 if i == 5 else 4,), 1000.0 + i)})
    assert _txnid(big) == _txnid(small), "the two databases must share a txnid for the index to be reused"
    if damaged:
        with open(os.path.join(small, "data.mdb"), "r+b") as f:
            data = f.read()
            node = data.find(b"\x01\x00\x08\x00" + (5).to_bytes(8, "big"))  # F_BIGDATA, 8-byte key 5
            assert node >= 4 and data.find(b"\x01\x00\x08\x00" + (5).to_bytes(8, "big"), node + 1) < 0
            f.seek(node - 4)
            f.write((64 << 20).to_bytes(4, "little"))
    assert os.path.getsize(os.path.join(small, "data.mdb")) < os.path.getsize(os.path.join(big, "data.mdb")) // 4
    return big, os.path.join(small, "data.mdb")


def _run_stale_index(tmp_path, damaged: bool):
    big, replacement = _same_txnid_smaller_database(tmp_path, damaged)
    rc, out, err = run_script(_STALE_INDEX, big, replacement, "1" if damaged else "0")
    done = [ln for ln in out.splitlines() if ln.startswith("DONE ")]
    assert rc == 0 and done, (f"reading a database replaced in place under its value index: {_status(rc)} "
                              f"(a crash instead of CorruptedError)\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
    res = json.loads(done[0][5:])
    assert res["fill"] == {"returned": [19.0, 18.0]}, res
    return big, res


def _assert_stale_hit_refused(big: str, stale: dict, why: str = "") -> None:
    # The value index's entry points into pages the file no longer has: an
    # error naming the path (and ``why``), or (an index that knows the file
    # changed) the new file's own sample 19 (1019.0). Never a crash, never
    # other bytes.
    if "corrupted" in stale:
        assert big in stale["corrupted"] and why in stale["corrupted"], stale
    else:
        assert stale == {"returned": [1019.0]}, stale


def test_value_index_hit_outside_the_file_is_corrupted_error(tmp_path):
    """Env::check_sample_value on a ValueIndex hit (BatchLookup::seek): the file
    was replaced in place by a smaller database of the same txnid, so the
    index of the snapshot is reused and its entry for sample 19 points past
    the end of the file. Reading sample 5 first (a damaged value past the
    file: found by the B-tree search, CorruptedError) makes the Env see the
    file's new size; the index hit for 19 must then be CorruptedError too. Without
    the check on the hit, the copy touches the map past the file: SIGBUS."""
    big, res = _run_stale_index(tmp_path, damaged=True)
    assert "corrupted" in res["damaged"] and "sample index 5" in res["damaged"]["corrupted"], res
    _assert_stale_hit_refused(big, res["stale"], "outside the file")  # the bounds check's words


def test_value_index_after_the_file_shrank_in_place(tmp_path):
    """The same replacement without a read in between that makes the Env
    look at the file's size: the index hit for sample 19 must still not
    crash (CorruptedError naming the path, whichever check raises it, or
    the new file's sample 19)."""
    big, res = _run_stale_index(tmp_path, damaged=False)
    _assert_stale_hit_refused(big, res["stale"])


# -- 13f: a meta page's page size is checked at open ----------------------------------
_OPEN_EACH = r"""
import json, sys
import torch_lmdb
for path in sys.argv[1:]:
    try:
        torch_lmdb.LMDBDataset(path)
        r = {"opened": True}
    except torch_lmdb.CorruptedError as e:
        r = {"corrupted": str(e)}
    except Exception as e:
        r = {"other": f"{type(e).__name__}: {e}"}
    print("OPEN " + json.dumps(dict(r, path=path)), flush=True)
"""

BAD_PAGE_SIZES = [0, 1, 256, 511, 513, 3000, 4095, 4097, 65535, 65536 * 2, 2**31, 2**32 - 1]


def test_meta_page_with_a_bad_page_size_is_corrupted_error(tmp_path, make_db):
    """check_meta_pages (env.cpp): a page size in either meta page that is not
    a power of two from 512 to 64 KiB (256 and 128 KiB are powers of two:
    only the bounds refuse them) is CorruptedError naming data.mdb and the
    size, before LMDB reads it (page size 0 made LMDB divide by zero)."""
    original = make_db(5)
    with open(os.path.join(original, "data.mdb"), "rb") as f:
        data = f.read()
    assert struct.unpack_from("<I", data, 40)[0] == PAGE and struct.unpack_from("<I", data, PAGE + 40)[0] == PAGE
    cases = {}
    for meta in (0, 1):
        for psize in BAD_PAGE_SIZES:
            path = str(tmp_path / f"meta{meta}-psize{psize}")
            os.makedirs(path)
            damaged = bytearray(data)
            struct.pack_into("<I", damaged, meta * PAGE + 40, psize)
            with open(os.path.join(path, "data.mdb"), "wb") as f:
                f.write(damaged)
            cases[path] = (meta, psize)
    rc, out, err = run_script(_OPEN_EACH, *cases)
    results = [json.loads(ln[5:]) for ln in out.splitlines() if ln.startswith("OPEN ")]
    assert rc == 0 and len(results) == len(cases), (
        f"opening databases with bad meta page sizes: {_status(rc)} after {len(results)} of {len(cases)}"
        f"\n{out[-3000:]}\n{err[-3000:]}")
    wrong = []
    for r in results:
        meta, psize = cases[r["path"]]
        message = r.get("corrupted", "")
        if not (os.path.join(r["path"], "data.mdb") in message and f"page size of {psize} bytes" in message
                and f"meta page {meta}" in message):
            wrong.append(f"meta page {meta}, page size {psize}: {r}")
    assert not wrong, "\n".join(wrong)
    assert len(torch_lmdb.LMDBDataset(original)) == 5


# -- 13g: Blosc shuffles complex payloads by their component size ---------------------
@pytest.mark.parametrize("codec", ["lz4", "zstd"])
@pytest.mark.parametrize("format_version", [2, 4])
def test_blosc_typesize_of_complex_payloads_is_the_component_size(tmp_path, codec, format_version):
    """shuffle_typesize (record.cpp) and docs/FORMAT.md: Blosc's typesize is the
    itemsize, half of it for complex dtypes (complex64: 4, complex128: 8: the
    real and imaginary parts are floats that shuffle like numcodecs'). The
    typesize is byte 3 of the Blosc header of each stored payload (records
    parsed by hand with py-lmdb, as test_compression does)."""
    path = str(tmp_path / "db")
    k = torch.arange(512) % 8
    fields = {"c64": torch.complex(k.float(), -k.float()), "c128": torch.complex(k.double(), k.double() / 2),
              "f32": k.float()}
    want = {"c64": 4, "c128": 8, "f32": 4}
    with torch_lmdb.LMDBWriter(path, compression=codec, format_version=format_version) as w:
        for i in range(3):
            w.write({name: t + i for name, t in fields.items()})
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    for i in range(3):
        got = ds[i]
        for name, t in fields.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t + i), name
    record, schema = read_record(path, 0)
    version, payloads = parse_fields(record, schema)
    assert version == format_version
    for name, size in want.items():
        stored_codec, at, length = payloads[name]
        assert stored_codec in (1, 2), f"{name} was stored raw (codec {stored_codec}): nothing to check"
        _, _, flags, typesize = record[at:at + 4]
        nbytes, _, cbytes = struct.unpack_from("<III", record, at + 4)
        assert nbytes == fields[name].numel() * fields[name].element_size() and cbytes == length
        assert flags & 0x1, f"{name}: the Blosc frame is not byte-shuffled (flags {flags:#x})"
        assert typesize == size, f"{name} ({fields[name].dtype}): Blosc typesize {typesize}, expected {size}"

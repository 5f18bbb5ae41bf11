"""Files changed under a running job: truncated, replaced by rename, copied over
in place; damaged metadata; a live writer against a dead one.

Reads that may fault run in a child process: a crash (SIGBUS, SIGSEGV) is a
failed test with the child's output, never a dead test runner."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import torch_lmdb
from conftest import layout_checksum

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_db(path, n, offset=0, width=4096, **kwargs):
    with torch_lmdb.LMDBWriter(path, **kwargs) as w:
        for i in range(n):
            w.write({"x": np.full(width, i + offset, dtype=np.float32), "i": i + offset})
    return path


def run_child(code, *args, timeout=120):
    """Runs `code` in a fresh interpreter (argv[1:] = args); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


TRUNCATE_CHILD = """
    import os, sys
    import numpy as np
    import torch_lmdb
    path = sys.argv[1]
    data = os.path.join(path, "data.mdb")
    original = open(data, "rb").read()
    for trial, keep in enumerate(float(k) for k in sys.argv[2:]):
        with open(data, "r+b") as f:   # the same file (inode) again, whole
            f.write(original)
        ds = torch_lmdb.LMDBDataset(path)
        n = len(ds)
        order = np.random.default_rng(trial).permutation(n).tolist()
        ds.get_batch(order[:64])           # pages mapped, value index filled
        os.truncate(data, int(len(original) * keep) // 4096 * 4096)
        errors = wrong = 0
        for start in range(0, n, 64):      # every sample, batched and alone
            idx = order[start:start + 64]
            try:
                batch = ds.get_batch(idx)
                wrong += int((batch["x"][:, 0] != batch["i"].float()).sum())
            except torch_lmdb.CorruptedError as e:
                assert "data.mdb" in str(e) or path in str(e), str(e)
                errors += 1
            try:
                s = ds[idx[0]]
                wrong += int(s["x"][0] != s["i"])
            except torch_lmdb.CorruptedError:
                errors += 1
        print("trial", trial, "keep", keep, "errors", errors, "wrong", wrong, flush=True)
"""


def truncation_trials(path, keeps):
    """[(errors, wrong)] of one child process truncating under an open reader once per `keeps`."""
    proc = run_child(TRUNCATE_CHILD, path, *keeps, timeout=600)
    assert proc.returncode == 0, f"child died ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    results = []
    for line in proc.stdout.splitlines():
        words = line.split()
        results.append((int(words[words.index("errors") + 1]), int(words[words.index("wrong") + 1])))
    assert len(results) == len(keeps), proc.stdout
    return results


def test_truncated_under_an_open_reader_raises_and_the_process_lives(tmp_path):
    path = write_db(str(tmp_path / "db"), 600)
    for errors, wrong in truncation_trials(path, [0.0, 0.1, 0.5, 0.9]):
        assert wrong == 0
        assert errors > 0  # the lost samples are refused, not read as zeros


TRUNCATE_NAMES_CHILD = """
    import os, sys
    import numpy as np
    import torch_lmdb
    path = sys.argv[1]
    data = os.path.join(path, "data.mdb")
    ds = torch_lmdb.LMDBDataset(path)  # checksums verified (the default)
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    ds.get_batch(order[:64])
    os.truncate(data, os.path.getsize(data) // 2 // 4096 * 4096)
    messages = []
    for i in range(len(ds)):  # one sample at a time: lost records, not only lost B-tree pages
        for read in (lambda: ds.get_batch([i]), lambda: ds[i]):
            try:
                read()
            except torch_lmdb.CorruptedError as e:
                messages.append(str(e))
    print(len(messages), sum("changed while it was mapped" in m for m in messages), flush=True)
    print([m for m in messages if "changed while it was mapped" not in m][:1], flush=True)
"""


def test_a_file_truncated_under_a_verifying_reader_is_reported_as_changed_not_as_damage(tmp_path):
    # Its lost pages read as zeros: their records fail their checksums, but
    # the error names the cause (the file changed under the map, refresh()).
    path = write_db(str(tmp_path / "db"), 600)
    proc = run_child(TRUNCATE_NAMES_CHILD, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed, named = map(int, proc.stdout.splitlines()[0].split())
    assert failed > 0 and named == failed, proc.stdout


def test_sixty_four_truncations_never_kill_the_reader(tmp_path):
    # One process: every trial after the first reopens an env its fault poisoned.
    path = write_db(str(tmp_path / "db"), 300)
    results = truncation_trials(path, [(t % 16) / 16 for t in range(64)])
    assert [w for _, w in results] == [0] * 64


def test_a_fault_outside_the_maps_still_reaches_faulthandler(tmp_path):
    # The guard chains: a crash that is not a mapped database read ends the
    # process as before, with Python's faulthandler report.
    path = write_db(str(tmp_path / "db"), 10)
    proc = run_child("""
        import ctypes, sys, torch_lmdb
        ds = torch_lmdb.LMDBDataset(sys.argv[1]); ds.get_batch([0, 1])
        ctypes.string_at(0)
    """, path)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)
    assert "Fatal Python error" in proc.stderr


def test_refresh_after_a_truncation_is_undone_reads_again(tmp_path):
    path = write_db(str(tmp_path / "db"), 300)
    proc = run_child("""
        import os, sys, torch_lmdb
        path = sys.argv[1]
        data = os.path.join(path, "data.mdb")
        original = open(data, "rb").read()
        ds = torch_lmdb.LMDBDataset(path)
        ds.get_batch(list(range(300)))
        os.truncate(data, 8192)
        try:
            ds.get_batch(list(range(300)))
            print("read zeros")
        except torch_lmdb.CorruptedError as e:
            print("refused:", e)
        with open(data, "r+b") as f:
            f.write(original)
        ds.refresh()
        b = ds.get_batch(list(range(300)))
        assert (b["x"][:, 0] == b["i"].float()).all()
        print("ok", len(ds))
    """, path)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "ok 300" in proc.stdout, proc.stdout


def test_refresh_reads_a_database_published_by_rename(tmp_path):
    live = write_db(str(tmp_path / "live"), 200)
    staged = write_db(str(tmp_path / "staged"), 300, offset=1000)
    ds = torch_lmdb.LMDBDataset(live)
    it = ds.iter_batches(50)
    next(it)
    assert ds.get_batch(list(range(200)))["i"].tolist() == list(range(200))
    os.rename(os.path.join(staged, "data.mdb"), os.path.join(live, "data.mdb"))  # as mv and rsync do
    assert ds.refresh() == 300
    batch = ds.get_batch(list(range(300)))
    assert batch["i"].tolist() == list(range(1000, 1300))
    assert (batch["x"][:, 0] == batch["i"].float()).all()
    assert ds[299]["i"] == 1299
    del it


def test_a_database_copied_over_in_place_is_read_after_refresh(tmp_path):
    # Same writer, same sample count and shapes: the same LMDB transaction id.
    live = write_db(str(tmp_path / "live"), 400)
    other = write_db(str(tmp_path / "other"), 400, offset=5000)
    ds = torch_lmdb.LMDBDataset(live)
    for _ in range(2):  # the value index holds every sample
        assert ds.get_batch(list(range(400)))["i"].tolist() == list(range(400))
    shutil.copyfile(os.path.join(other, "data.mdb"), os.path.join(live, "data.mdb"))  # cp: same inode
    ds.refresh()
    batch = ds.get_batch(list(range(400)))
    assert batch["i"].tolist() == list(range(5000, 5400))
    assert (batch["x"][:, 0] == batch["i"].float()).all()


def poke_meta_key(path, old, new):
    import lmdb

    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        value = txn.get(old, db=meta)
        txn.delete(old, db=meta)
        txn.put(new, value, db=meta)
    env.close()


@pytest.mark.parametrize("new", [b"compl\xe5te", b"\xff", b"format_version\xc0\x80"])
def test_a_metadata_key_that_is_not_utf8_is_corruption_naming_path_and_key(tmp_path, new):
    path = write_db(str(tmp_path / "db"), 3, width=4)
    poke_meta_key(path, b"complete", new)
    with pytest.raises(torch_lmdb.CorruptedError) as e:
        torch_lmdb.LMDBDataset(path)
    assert path in str(e.value) and "is not valid UTF-8" in str(e.value)
    assert "\\x" in str(e.value)  # the key, escaped


def test_a_metadata_value_that_is_not_json_is_corruption(tmp_path):
    import lmdb

    path = write_db(str(tmp_path / "db"), 3, width=4)
    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"complete", b"tr\xffe", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(torch_lmdb.CorruptedError, match="metadata 'complete' is not valid JSON"):
        torch_lmdb.LMDBDataset(path)


def test_append_keeps_the_databases_codecs(tmp_path):
    path = str(tmp_path / "db")
    rows = lambda first, n: ({"x": np.full(4096, i % 7, dtype=np.float32), "i": i} for i in range(first, first + n))
    with torch_lmdb.LMDBWriter(path, compression="zstd") as w:
        w.write_many(rows(0, 300))
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    with torch_lmdb.LMDBWriter(path, mode="a") as w:
        w.write_many(rows(300, 300))
    grown = os.path.getsize(os.path.join(path, "data.mdb")) - size
    assert grown < 300 * 4096 * 4 / 4, grown  # stored compressed, not raw (4.9 MB)
    fields = {f["name"]: f for f in torch_lmdb.info(path)["fields"]}
    assert fields["x"]["codec"] == "zstd" and fields["x"]["level"] == 5
    batch = torch_lmdb.LMDBDataset(path).get_batch(list(range(600)))
    assert (batch["x"][:, 0] == (batch["i"] % 7).float()).all()


def test_append_with_another_codec_lists_both(tmp_path):
    path = str(tmp_path / "db")
    write_db(path, 50, compression="zstd")
    with torch_lmdb.LMDBWriter(path, mode="a", compression="lz4") as w:
        w.write({"x": np.zeros(4096, dtype=np.float32), "i": 50})
    meta = torch_lmdb.LMDBDataset(path).metadata
    assert meta["compression"]["x"]["codec"] == "lz4"
    assert meta["compression"]["x"]["codecs"] == ["zstd:5", "lz4:5"]
    with torch_lmdb.LMDBWriter(path, mode="a", compression="none") as w:
        w.write({"x": np.zeros(4096, dtype=np.float32), "i": 51})
    meta = torch_lmdb.LMDBDataset(path).metadata
    assert meta["compression"]["x"]["codecs"] == ["zstd:5", "lz4:5", "none"]


WRITER_CHILD = """
    import sys, time, numpy as np, torch_lmdb
    w = torch_lmdb.LMDBWriter(sys.argv[1], commit_every=10)
    for i in range(20):
        w.write({"x": np.zeros(4, dtype=np.float32)})
    w.flush()
    print("ready", flush=True)
    time.sleep(120)
"""


def incomplete_warnings(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = torch_lmdb.LMDBDataset(path)
        ds.refresh()
        torch_lmdb.LMDBDataset(path)
    return len(ds), [w for w in caught if "did not close cleanly" in str(w.message)]


def test_a_live_writer_is_not_reported_as_dead_and_a_dead_one_once(tmp_path):
    path = str(tmp_path / "db")
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER_CHILD), path], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        n, caught = incomplete_warnings(path)
        assert n == 20 and caught == []  # being written: nothing to report
    finally:
        child.kill()
        child.wait()
    n, caught = incomplete_warnings(path)
    assert n == 20 and len(caught) == 1, [str(w.message) for w in caught]  # three opens, one report


def test_a_writer_of_this_process_is_live(tmp_path):
    path = str(tmp_path / "db")
    w = torch_lmdb.LMDBWriter(path, commit_every=5)
    for i in range(10):
        w.write({"x": np.zeros(4, dtype=np.float32)})
    w.flush()
    n, caught = incomplete_warnings(path)
    assert n == 10 and caught == []
    w.close()


def edit_meta(path, key, edit):
    import json

    import lmdb

    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        value = json.loads(txn.get(key, db=meta))
        txn.put(key, json.dumps(edit(value)).encode(), db=meta)
    env.close()


def swap_first_two(fields):
    fields[0]["name"], fields[1]["name"] = fields[1]["name"], fields[0]["name"]
    return fields


def set_dtype(fields):
    fields[0]["dtype"] = "int32"
    return fields


@pytest.mark.parametrize("edit", [swap_first_two, set_dtype])
def test_an_edited_schema_of_a_compact_database_is_refused(tmp_path, edit):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path, compression="lz4") as w:  # compact records: fields named by position
        for i in range(20):
            w.write({"a": np.full(64, i, dtype=np.float32), "b": np.full(64, -i, dtype=np.float32)})
    assert torch_lmdb.LMDBDataset(path).metadata["format_version"] == 5
    edit_meta(path, b"schema", edit)
    with pytest.raises(torch_lmdb.CorruptedError, match="layout checksum"):
        torch_lmdb.LMDBDataset(path, verify=True)
    with pytest.raises(torch_lmdb.CorruptedError, match="layout checksum"):
        torch_lmdb.LMDBWriter(path, mode="a")
    proc = subprocess.run([sys.executable, "-m", "torch_lmdb", "verify", path], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode != 0 and "layout checksum" in proc.stdout + proc.stderr


@pytest.mark.parametrize("key, edit", [(b"format_version", lambda v: 2), (b"samples_per_value", lambda v: v + 1)])
def test_an_edited_version_or_packing_is_refused(tmp_path, key, edit):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path, compression="lz4", samples_per_value=4) as w:
        for i in range(20):
            w.write({"a": np.full(64, i, dtype=np.float32)})
    edit_meta(path, key, edit)
    with pytest.raises(torch_lmdb.CorruptedError):
        torch_lmdb.LMDBDataset(path)


def test_the_layout_checksum_is_the_documented_canonical_form(tmp_path):
    # docs/FORMAT.md: xxh3-64 of the sorted, whitespace-free JSON of the layout keys.
    import ctypes
    import ctypes.util
    import json

    xxhash = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
    xxhash.XXH3_64bits.restype = ctypes.c_uint64
    xxhash.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    path = write_db(str(tmp_path / "db"), 3, width=4)
    meta = torch_lmdb.LMDBDataset(path).metadata
    keys = ["byte_order", "checksum", "format", "format_version", "samples_per_value", "schema"]
    text = json.dumps({k: meta[k] for k in keys if k in meta}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    data = text.encode()
    assert meta["layout_xxh3_64"] == f"{xxhash.XXH3_64bits(data, len(data)):016x}"
    assert meta["layout_xxh3_64"] == layout_checksum(meta)  # (conftest's, which other tests use)


APPENDER_CHILD = """
    import sys, time, numpy as np, torch_lmdb
    with torch_lmdb.LMDBWriter(sys.argv[1], mode="a", commit_every=1) as w:
        deadline = time.time() + float(sys.argv[2])
        i = 0
        while time.time() < deadline:
            w.write({"x": np.full(4096, i, dtype=np.float32), "i": i})
            w.flush()
            i += 1
"""


def test_threads_refreshing_while_a_writer_appends_never_see_the_length_go_back(tmp_path):
    import threading

    path = write_db(str(tmp_path / "db"), 10)
    ds = torch_lmdb.LMDBDataset(path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APPENDER_CHILD), path, "4"], env=env)
    failures = []

    def refresh_and_read():
        last = 0
        while writer.poll() is None and len(failures) < 10:
            try:
                ds.refresh()
                n = len(ds)
                if n < last:
                    failures.append(f"len went from {last} to {n}")
                last = n
                ds[n - 1]
                ds.get_batch([n - 1, 0])
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(repr(e))

    threads = [threading.Thread(target=refresh_and_read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    writer.wait(timeout=60)
    assert writer.returncode == 0
    assert failures == []
    assert len(ds) > 10


META_FLIP_CHILD = """
    import os, shutil, sys
    import torch_lmdb
    src, work, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pages = [int(p) for p in sys.argv[4:]]
    original = open(os.path.join(src, "data.mdb"), "rb").read()
    outcomes = {}
    offsets = [o for page in pages for o in range(page * 4096, page * 4096 + 4096, step)]
    for k, offset in enumerate(offsets):
        copy = os.path.join(work, f"c{k}")
        os.makedirs(copy)
        data = bytearray(original)
        data[offset] ^= 0xFF
        open(os.path.join(copy, "data.mdb"), "wb").write(bytes(data))
        print("flip", offset, flush=True)   # the last line names the flip that killed the process
        try:
            ds = torch_lmdb.LMDBDataset(copy, verify=True)
            ds.get_batch(list(range(len(ds))))
            outcome = "read"
        except (torch_lmdb.Error, OSError) as e:
            outcome = type(e).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(copy)
    print("outcomes", outcomes)
"""


def test_a_damaged_metadata_page_never_kills_the_opening_process(tmp_path):
    # The meta table's leaf page (read while opening, before any sample):
    # every 5th byte of it flipped, each in its own copy.
    src = str(tmp_path / "packed")
    with torch_lmdb.LMDBWriter(src, compression="lz4") as w:
        for i in range(200):
            w.write({"x": np.full(1024, i, dtype=np.float32), "i": i, "s": f"sample-{i}"})
    data = open(os.path.join(src, "data.mdb"), "rb").read()
    # Pages holding the metadata's keys: the live leaf page and older copies of it.
    pages, at = set(), data.find(b"samples_per_value")
    while at >= 0:
        pages.add(at // 4096)
        at = data.find(b"samples_per_value", at + 1)
    assert pages
    work = tmp_path / "copies"
    work.mkdir()
    proc = run_child(META_FLIP_CHILD, src, work, 5, *sorted(pages)[-4:], timeout=900)
    assert proc.returncode == 0, f"died ({proc.returncode}) at {proc.stdout.splitlines()[-1:]}: {proc.stderr[-2000:]}"
    assert "outcomes" in proc.stdout

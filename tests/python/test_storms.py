"""Fault storms, bounded in time: killed writers, readers racing map growth,
a writer and readers in one process, reader-table exhaustion, a full disk.

Every storm runs in subprocesses (tests/python/_storm_worker.py), so a signal
inside the library (SIGSEGV, SIGBUS) is a test failure naming the signal, not
the end of pytest. Randomness is seeded; the seed is printed (pytest -s, or in
the failure report) and can be forced with TORCH_LMDB_STORM_SEED.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.storm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "_storm_worker.py")


def seed_for(name: str) -> int:
    seed = int(os.environ.get("TORCH_LMDB_STORM_SEED", random.SystemRandom().randrange(2**31)))
    print(f"{name}: seed {seed} (rerun with TORCH_LMDB_STORM_SEED={seed})")
    return seed


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def describe_status(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def run_worker(*args, timeout: float = 170):
    """Runs the worker to completion; returns (returncode, RESULT dict or None, output)."""
    try:
        p = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=_env())
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"worker {args[0]} did not finish in {timeout} s (hang?); output:\n{out[-4000:]}")
    return p.returncode, parse_result(p.stdout), p.stdout + p.stderr


def parse_result(stdout: str):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def start_worker(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())


def wait_ready(p: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Reads the worker's output until READY (with a safety timeout)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = p.stdout.readline()
        if not line:
            p.wait()
            pytest.fail(f"{what} ended before it was ready ({describe_status(p.returncode)}):\n{''.join(seen)}")
        seen.append(line)
        if line.strip() == "READY":
            return
    p.kill()
    pytest.fail(f"{what} was not ready after {timeout} s:\n{''.join(seen)}")


def finish(p: subprocess.Popen, timeout: float = 170):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        pytest.fail(f"worker did not finish in {timeout} s (hang?); output:\n{out[-4000:]}")
    return p.returncode, parse_result(out), out


# -- 1 -------------------------------------------------------------------------
def test_sigkill_storm_keeps_every_committed_sample(tmp_path):
    """50 SIGKILLs of a writer mid-write (small initial maps, so kills land
    in map growth and commits; random commit_every); after each kill every
    committed sample verifies and mode="a" continues from the committed count.
    The writer never stops by itself (it reports a random sample count, then
    is killed within 50 ms while it writes on), so every cycle is one mid-write
    kill whatever the machine's load: the count does not depend on a race."""
    seed = seed_for("sigkill storm")
    rc, res, out = run_worker("kill-storm", tmp_path / "db", "--seed", seed, "--kills", 50, timeout=240)
    assert rc == 0, f"kill storm failed ({describe_status(rc)}), seed {seed}:\n{out[-6000:]}"
    assert res["mid_write_kills"] >= 50 and res["mid_write_kills"] == res["cycles"] == res["kills"], res
    assert res["samples"] > 0 and not res["problems"], res
    print(res)


# -- 2 -------------------------------------------------------------------------
def test_threaded_readers_while_another_process_grows_the_map(tmp_path):
    """iter_batches(threads=2) and three get_batch threads in one process read
    and check every batch exactly while another process appends and grows the
    map >= 20 times from a tiny map_size (each append session reopens with
    map_size=64 KiB). A signal in the readers is a failure naming it."""
    seed = seed_for("threaded readers vs growing map")
    path = tmp_path / "db"
    rc, res, out = run_worker("write-growing", path, "--seed", seed, "--initial", "--per-session", 2000)
    assert rc == 0, out
    stop = tmp_path / "stop"
    readers = start_worker("threaded-readers", path, "--seed", seed, "--stop-file", stop)
    try:
        wait_ready(readers, "the reader process")
        wrc, wres, wout = run_worker("write-growing", path, "--seed", seed + 1, "--growths", 20,
                                     "--min-sessions", 20, "--per-session", 2500)
        stop.write_text("stop")
        rrc, rres, rout = finish(readers)
    finally:
        if readers.poll() is None:
            readers.kill()
            readers.wait()
    assert rrc == 0, f"readers failed ({describe_status(rrc)}), seed {seed}:\n{rout[-6000:]}"
    assert wrc == 0, f"writer failed ({describe_status(wrc)}), seed {seed}:\n{wout[-4000:]}"
    assert wres["growths"] >= 20, wres
    assert rres["stream_batches"] > 0 and rres["get_batches"] > 0 and rres["reopens"] > 0, rres
    assert rres["final_len"] == 2000 + wres["sessions"] * 2500, (rres, wres)
    print(wres, rres)


# -- 3 -------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["datasets-first", "writer-first"])
def test_writer_and_datasets_in_one_process(tmp_path, order):
    """LMDBWriter(path, mode="a") while LMDBDataset(path) objects read in
    threads (datasets opened before the writer, or the writer first), the
    writer growing the map from 64 KiB; after each flush, ds.refresh() makes
    the appended samples visible and len(ds) follows."""
    seed = seed_for("writer and datasets in one process")
    extra = ["--writer-first"] if order == "writer-first" else []
    rc, res, out = run_worker("same-process", tmp_path / "db", "--seed", seed, *extra)
    assert rc == 0, f"same-process storm failed ({describe_status(rc)}), seed {seed}:\n{out[-6000:]}"
    assert res["reads"] > 0 and not res["errors"], res


# -- 4 -------------------------------------------------------------------------
def test_reader_table_exhaustion_and_reclaim(tmp_path):
    """max_readers=N: N reader processes fill the table; SIGKILLed, their slots
    are reclaimed for the next N (two rounds); with N live readers the next
    one gets ReadersFullError naming the path and max_readers=N."""
    n = 4
    path = str(tmp_path / "db")
    rc, res, out = run_worker("write-growing", path, "--seed", 0, "--initial", "--per-session", 10)
    assert rc == 0, out
    os.remove(os.path.join(path, "lock.mdb"))  # the readers create a lock file sized for max_readers=N
    holders = []
    full_messages = []
    try:
        for round_ in range(2):
            holders = [start_worker("hold", path, "--max-readers", n) for _ in range(n)]
            for h in holders:
                wait_ready(h, f"reader {len(holders)} of round {round_}")
            rc, res, out = run_worker("probe", path, "--max-readers", n)
            assert rc == 0, f"probe with a full reader table: {describe_status(rc)}\n{out}"
            assert not res["ok"], f"round {round_}: an extra reader was admitted with {n} live readers and max_readers={n}"
            assert res["readers_full"], f"expected ReadersFullError, got {res['type']}: {res['message']}"
            full_messages.append(res["message"])
            for h in holders:
                h.send_signal(signal.SIGKILL)
            for h in holders:
                h.wait()
            holders = []
            # Every slot belongs to a dead process now: a new reader is admitted.
            rc, res, out = run_worker("probe", path, "--max-readers", n)
            assert rc == 0 and res["ok"], f"round {round_}: stale slots not reclaimed: {res or out}"
    finally:
        for h in holders:
            h.kill()
            h.wait()
    for message in full_messages:  # checked last, so the reclaim rounds above run first
        assert path in message, message
        assert f"max_readers={n}" in message, f"the message should name max_readers={n}: {message}"


# -- 5 -------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 MiB tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root (full-disk storms skipped)"
        print(reason)
        pytest.skip(reason)
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_to(directory, name: str, leave: int) -> str:
    """Writes a filler file so that about ``leave`` bytes stay free."""
    st = os.statvfs(directory)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    filler = os.path.join(directory, name)
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            f.write(chunk[: min(size, len(chunk))])
            size -= min(size, len(chunk))
    return filler


def _assert_enospc(error, path: str, what: str) -> None:
    assert error is not None, f"{what}: no error on a full disk"
    message = error["message"]
    assert error["oserror"] or error["torch_lmdb_error"], f"{what}: {error['type']}: {message}"
    assert "ENOSPC" in message or "No space" in message, f"{what}: not a full-disk error: {error['type']}: {message}"
    assert "EIO" not in message, f"{what}: {message}"
    assert path in message, f"{what}: the message does not name '{path}': {message}"


def test_full_disk_writer_keeps_committed_prefix_and_resumes(small_tmpfs):
    """Appending until a 24 MiB tmpfs is full: a clear ENOSPC error naming the
    path; the committed prefix verifies; after a filler file is removed,
    mode="a" appends 3000 more and closes cleanly."""
    path = str(small_tmpfs / "db")
    filler = _fill_to(small_tmpfs, "filler", leave=6 << 20)
    rc, res, out = run_worker("fill", path, "--commit-every", 50)
    assert rc == 0, f"filling the disk: {describe_status(rc)}\n{out[-4000:]}"
    assert res["error"] is not None, f"no error after writing {res['written']} samples to a full disk"
    rc, check, out = run_worker("check", path)
    assert rc == 0, f"the committed prefix after ENOSPC: {describe_status(rc)}\n{out[-4000:]}"
    assert 0 < check["n"] <= res["written"], (check, res)
    os.remove(filler)
    rc, more, out = run_worker("fill", path, "--limit", 3000)
    assert rc == 0 and more["error"] is None, f"append after freeing space: {describe_status(rc)} {more}\n{out[-4000:]}"
    rc, after, out = run_worker("check", path)
    assert rc == 0, out
    assert after["n"] == check["n"] + 3000 and after["complete"], (check, after)
    # Checked last, so the prefix and resume checks above run whatever the message.
    _assert_enospc(res["error"], path, "writing until the disk is full")


def test_full_disk_new_database_is_an_error_not_a_signal(small_tmpfs):
    """Creating a database on a full tmpfs (LMDB cannot extend its lock file):
    an ENOSPC error naming the path, never a signal."""
    _fill_to(small_tmpfs, "filler", leave=0)
    with open(os.path.join(small_tmpfs, "last"), "wb", buffering=0) as f:  # the last blocks too
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    path = str(small_tmpfs / "new")
    rc, res, out = run_worker("create", path)
    assert rc == 0, f"creating a database on a full disk: {describe_status(rc)}\n{out[-4000:]}"
    _assert_enospc(res["error"], path, "creating a database on a full disk")

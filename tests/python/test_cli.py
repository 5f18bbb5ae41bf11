import json
import os
import subprocess
import sys

import lmdb
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch_lmdb", *args], capture_output=True, text=True, env=env)


def test_help_of_every_command():
    for args in ([], ["convert"], ["info"], ["verify"]):
        proc = cli(*args, "--help")
        assert proc.returncode == 0 and "usage: torch-lmdb" in proc.stdout


def test_info_json_parses(make_db):
    path = make_db(7, user_metadata={"origin": "sim"})
    proc = cli("info", "--json", path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["num_samples"] == 7 and info["metadata"]["user"] == {"origin": "sim"}
    text = cli("info", path).stdout
    assert "samples:        7" in text and "float32" in text


def test_verify_finds_a_flipped_byte(make_db):
    path = make_db(30)
    ok = cli("verify", path)
    assert ok.returncode == 0 and "ok, 30 samples" in ok.stdout
    env = lmdb.open(path, max_dbs=4)
    db = env.open_db(b"samples")
    with env.begin(write=True) as txn:
        key = (17).to_bytes(8, "big")
        value = bytearray(txn.get(key, db=db))
        value[-20] ^= 0x01
        txn.put(key, bytes(value), db=db)
    env.close()
    bad = cli("verify", path)
    assert bad.returncode == 1
    assert "index 17" in bad.stdout and "checksum mismatch" in bad.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = cli("info", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "missing" in proc.stderr

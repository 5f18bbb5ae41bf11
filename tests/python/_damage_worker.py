"""Subprocess side of tests/python/test_damage.py (not a test module).

    python _damage_worker.py make ORIGINAL
    python _damage_worker.py run ORIGINAL WORKDIR CASES.json

``run`` applies each damage case (truncate data.mdb to a size, or xor one byte
at an offset) to a fresh copy of ORIGINAL, then forks one child per case and
mode (verify=False, verify=True) that opens the copy with LMDBDataset and reads
every sample. Forking from this process (torch already imported) keeps each
case cheap and isolated: a child killed by a signal marks that case only.
Every case prints one ``CASE {json}`` line; the last line is ``RESULT {json}``.
"""
import json
import os
import shutil
import signal
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import torch_lmdb  # noqa: E402

NUM_SAMPLES = 300
CHILD_TIMEOUT = 30.0  # seconds; a child still running then is reported as a hang


def damage_sample(i: int) -> dict:
    """Sample i of the original database; every 37th spans overflow pages."""
    width = 2000 if i % 37 == 0 else 8 + (i % 50) * 8
    return {"index": i, "x": np.arange(width, dtype=np.float32) + np.float32(i), "label": f"item-{i}"}


def matches(i: int, got) -> bool:
    if not isinstance(got, dict) or set(got) != {"index", "x", "label"}:
        return False
    want = damage_sample(i)
    x = got["x"]
    return (isinstance(got["index"], torch.Tensor) and got["index"].dtype == torch.int64
            and got["index"].dim() == 0 and got["index"].item() == i
            and isinstance(x, torch.Tensor) and x.dtype == torch.float32
            and torch.equal(x, torch.from_numpy(want["x"])) and got["label"] == want["label"])


def cmd_make(path: str) -> int:
    with torch_lmdb.LMDBWriter(path, commit_every=40) as w:
        for i in range(NUM_SAMPLES):
            w.write(damage_sample(i))
    return 0


def apply_damage(original: str, target: str, case: dict) -> None:
    os.makedirs(target)
    with open(os.path.join(original, "data.mdb"), "rb") as f:
        data = bytearray(f.read())
    if case["kind"] == "truncate":
        data = data[: case["size"]]
    elif case["kind"] == "flip":
        for off, mask in zip(case["offsets"], case["masks"]):
            data[off] ^= mask
    else:
        raise ValueError(case)
    with open(os.path.join(target, "data.mdb"), "wb") as f:
        f.write(data)


def read_all(path: str, verify: bool) -> dict:
    """Opens ``path`` and reads every sample; classifies what happened."""
    out = {"opened": False, "returned": 0, "ok_errors": 0, "bad_errors": [], "wrong": []}

    def error(where, e):
        good = isinstance(e, (torch_lmdb.Error, OSError)) and path in str(e)
        if good:
            out["ok_errors"] += 1
        elif len(out["bad_errors"]) < 3:
            out["bad_errors"].append(f"{where}: {type(e).__name__}: {str(e)[:300]}")

    try:
        ds = torch_lmdb.LMDBDataset(path, verify=verify)
    except Exception as e:  # noqa: BLE001 - classified
        error("open", e)
        return out
    out["opened"] = True
    out["len"] = len(ds)
    for i in range(min(len(ds), NUM_SAMPLES + 10)):
        try:
            got = ds[i]
        except Exception as e:  # noqa: BLE001
            error(f"ds[{i}]", e)
            continue
        out["returned"] += 1
        if not matches(i, got) and len(out["wrong"]) < 3:
            out["wrong"].append(i)
    return out


def run_case(path: str, verify: bool) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            msg = read_all(path, verify)
        except BaseException as e:  # noqa: BLE001
            msg = {"crash": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(msg).encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + CHILD_TIMEOUT
    status = None
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    if status is None:
        return {"outcome": f"hang (still running after {CHILD_TIMEOUT:.0f} s)"}
    if os.WIFSIGNALED(status):
        return {"outcome": f"killed by {signal.Signals(os.WTERMSIG(status)).name}"}
    msg = json.loads(data) if data else {"crash": f"no report, exit status {os.WEXITSTATUS(status)}"}
    if "crash" in msg:
        return {"outcome": f"unexpected exception: {msg['crash']}"}
    if msg["bad_errors"]:
        return {"outcome": "error not naming the path or of the wrong type", **msg}
    if verify and msg["wrong"]:
        return {"outcome": "wrong data with verify=True", **msg}
    return {"outcome": "ok", **msg}


def cmd_run(original: str, workdir: str, cases_file: str) -> int:
    with open(cases_file) as f:
        cases = json.load(f)
    counts = {}
    for k, case in enumerate(cases):
        for verify in (False, True):
            target = os.path.join(workdir, f"case{k:04d}-{int(verify)}")
            apply_damage(original, target, case)
            res = run_case(target, verify)
            shutil.rmtree(target, ignore_errors=True)
            counts[res["outcome"].split(" (")[0]] = counts.get(res["outcome"].split(" (")[0], 0) + 1
            print("CASE " + json.dumps({"case": k, "damage": case, "verify": verify, **res}), flush=True)
    print("RESULT " + json.dumps({"counts": counts}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "make":
        sys.exit(cmd_make(sys.argv[2]))
    sys.exit(cmd_run(*sys.argv[2:5]))

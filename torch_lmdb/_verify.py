"""The verifier of ``torch-lmdb verify``: every record decoded with checksums on,
in a forked child, so a fault inside LMDB on a damaged file kills the child,
not the command; and the shards of a shard directory, checked against its manifest."""
import json
import os
import sys
from typing import List, Optional


def _verify_walk(path: str, max_errors: int, progress: bool, report) -> None:
    """Decodes every record of ``path`` with checksums on; calls report(dict).
    Runs in a child process: a fault inside LMDB's B-tree walk on a damaged
    file kills the child, not the command."""
    import torch_lmdb
    from torch_lmdb import _C

    reader = _C.Reader([path], verify=True)
    for message in reader.take_warnings():
        print(f"warning: {message}", file=sys.stderr)
    meta = json.loads(reader.metadata_json(0))
    n = len(reader)
    bad: List[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="sample", desc=f"verifying {os.path.basename(path)}", file=sys.stderr)
    for i in range(n):
        report({"at": i})
        try:
            reader.get(i)
        except torch_lmdb.Error as e:
            bad.append(f"index {i}: {e}")
            if len(bad) >= max_errors:
                break
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report({"n": n, "bad": bad, "complete": bool(meta.get("complete", False))})


def verify_in_child(path: str, max_errors: int, progress: bool) -> dict:
    """Runs _verify_walk in a forked child; returns its last report, or
    {"signal": name, "at": index} when a signal killed it."""
    import signal

    if not hasattr(os, "fork"):  # no fork: walk in this process
        last: dict = {}
        _verify_walk(path, max_errors, progress, last.update)
        return last
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: report lines of JSON, never return
        code = 0
        try:
            os.close(r)

            def report(msg: dict) -> None:
                os.write(w, (json.dumps(msg) + "\n").encode())

            _verify_walk(path, max_errors, progress, report)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            try:
                os.write(w, (json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n").encode())
            except BaseException:  # noqa: BLE001
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    last = {}
    at = None
    with os.fdopen(r, "rb") as pipe:
        for line in pipe:
            msg = json.loads(line)
            if "at" in msg and len(msg) == 1:
                at = msg["at"]
            else:
                last = msg
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name, "at": at}
    if not last:
        return {"error": f"the checking process ended without a report (exit status {os.WEXITSTATUS(status)})"}
    return last


def shard_paths(path: str) -> Optional[List[str]]:
    """The shards of a shard directory, checked against its manifest (sample
    counts, metadata checksums, schema); None for a plain database. Raises on
    an incomplete directory or a mismatched shard."""
    from torch_lmdb import _C, _manifest

    if os.path.isfile(os.path.join(path, "data.mdb")) or not os.path.isdir(path):
        return None
    if not _manifest.is_manifest_dir(path) and not _manifest.shard_like_entries(path):
        return None
    _manifest.read_manifest(path)  # incomplete directory, unreadable manifest
    return list(_C.Reader([path]).paths)  # every shard against the manifest

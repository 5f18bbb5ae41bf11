"""Test servers for staged datasets: nginx (Debian's nginx-light) on 127.0.0.1
with a configuration of the test's own, and a fault-injecting proxy in front
of it (503s, bodies cut short, stalls)."""
import http.client
import http.server
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from typing import Optional

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Nginx:
    """nginx serving `root` at http://127.0.0.1:<port>/, logging every request
    (access_log lines: "<status> <bytes> <uri>")."""

    def __init__(self, root: str, workdir: str, limit_rate: Optional[str] = None):
        self.root, self.dir = os.path.abspath(root), os.path.abspath(workdir)
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        self.port = free_port()
        self.access_log = os.path.join(self.dir, "access.log")
        rate = f"limit_rate {limit_rate};" if limit_rate else ""
        # As root, nginx's workers would run as nobody, who cannot read the tests' directories.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = f"""
{user}
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 512; }}
http {{
  log_format t '$status $body_bytes_sent $request_uri';
  access_log {self.access_log} t;
  client_body_temp_path {self.dir}/tmp/body;
  proxy_temp_path {self.dir}/tmp/proxy;
  fastcgi_temp_path {self.dir}/tmp/fastcgi;
  uwsgi_temp_path {self.dir}/tmp/uwsgi;
  scgi_temp_path {self.dir}/tmp/scgi;
  types {{ application/json json; }}
  default_type application/octet-stream;
  keepalive_requests 10000;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
    location / {{ {rate} }}
  }}
}}
"""
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen([NGINX, "-c", self.conf, "-p", self.dir, "-e", os.path.join(self.dir, "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self, suffix: str = "") -> list:
        """(status, bytes, uri) of the requests so far whose uri ends with `suffix`."""
        time.sleep(0.05)  # nginx writes its log line after the response
        try:
            with open(self.access_log) as f:
                lines = [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [(int(s), int(b), u) for s, b, u in lines if u.endswith(suffix)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FaultProxy:
    """Forwards GETs to `upstream` (host:port); answers `p503` of them with 503,
    cuts `pcut` of the bodies short (full Content-Length, half the bytes, then
    the connection closes), and stalls `pstall` of them for `stall` seconds
    before the first byte. Counts what it did in .counts."""

    def __init__(self, upstream_port: int, p503: float = 0.0, pcut: float = 0.0, pstall: float = 0.0,
                 stall: float = 0.0, seed: int = 0):
        rng = random.Random(seed)
        lock = threading.Lock()
        counts = {"requests": 0, "503": 0, "cut": 0, "stall": 0}
        self.counts = counts

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with lock:
                    counts["requests"] += 1
                    r = rng.random()
                    fault = "503" if r < p503 else "cut" if r < p503 + pcut else \
                        "stall" if r < p503 + pcut + pstall else None
                    if fault:
                        counts[fault] += 1
                if fault == "503":
                    body = b"unavailable"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault == "stall":
                    time.sleep(stall)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range",)}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "content-range", "accept-ranges"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                if fault == "cut":
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body if fault != "cut" else body[: len(body) // 2])
                if fault == "cut":
                    self.close_connection = True
                conn.close()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

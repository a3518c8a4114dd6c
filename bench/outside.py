"""A stand-in for "the outside" on this host, for the network tests and benchmark: a network namespace reached
through a veth pair, with a public test range (198.51.100.0/24) and a private one (172.31.254.0/24), an HTTP server
(files by path, `sendfile` for speed), a DNS server (`outside.test` → the public address), a server that accepts
connections and holds them, and a UDP sink that logs each datagram's source and payload (`udp.log` in the served
directory). Needs root and `ip` (iproute2).
"""

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

NETNS = "dtout"
ADDRESS = "198.51.100.2"
HOST_END = "198.51.100.1"
PRIVATE = "172.31.254.2"
HTTP_PORT = 8080
HOLD_PORT = 8081
UDP_PORT = 8082

# Serves the files of its directory (argv[1]) on HTTP_PORT with keep-alive, sending their bytes with sendfile.
HTTP_SERVER = r"""
import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        path = os.path.join(sys.argv[1], os.path.basename(self.path))
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404)
            return
        with f:
            self.send_response(200)
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(f)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", %d), Handler).serve_forever()
""" % HTTP_PORT

# Answers A queries for `outside.test` with ADDRESS; every other name does not exist.
DNS_SERVER = r"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    i, labels = 12, []
    while i < len(q) and q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace"))
        i += 1 + q[i]
    question = q[12:i + 5]
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0] if i + 3 <= len(q) else 0
    found = ".".join(labels).lower() == "outside.test"
    answer = b""
    if found and qtype == 1:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("%s")
    flags = 0x8180 if found else 0x8183
    head = q[:2] + struct.pack(">HHHHH", flags, 1, 1 if answer else 0, 0, 0)
    s.sendto(head + question + answer, peer)
""" % ADDRESS

# Accepts connections and keeps them open, answering nothing.
HOLD_SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d))
s.listen()
held = []
while True:
    held.append(s.accept()[0])
""" % HOLD_PORT


# Appends "SOURCE PAYLOAD" for each datagram on UDP_PORT to argv[1].
UDP_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", %d))
while True:
    data, peer = s.recvfrom(2048)
    with open(sys.argv[1], "a") as log:
        log.write("%%s %%s\n" %% (peer[0], data.decode("ascii", "replace")))
""" % UDP_PORT


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def outside(files: dict) -> Iterator[Path]:
    """The outside namespace serving ``files`` (name → bytes) over HTTP; yields their directory. Removed after."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "del", "dtout0"], capture_output=True)
    _run("ip", "netns", "add", NETNS)
    served = Path(tempfile.mkdtemp(prefix="deltabox-outside-"))
    for name, data in files.items():
        (served / name).write_bytes(data)
    servers = []
    try:
        _run("ip", "link", "add", "dtout0", "type", "veth", "peer", "name", "dtout1", "netns", NETNS)
        _run("ip", "addr", "add", f"{HOST_END}/24", "dev", "dtout0")
        _run("ip", "addr", "add", "172.31.254.1/24", "dev", "dtout0")
        _run("ip", "link", "set", "dtout0", "up")
        inside = ["ip", "netns", "exec", NETNS]
        _run(*inside, "ip", "addr", "add", f"{ADDRESS}/24", "dev", "dtout1")
        _run(*inside, "ip", "addr", "add", f"{PRIVATE}/24", "dev", "dtout1")
        _run(*inside, "ip", "link", "set", "dtout1", "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "route", "add", "default", "via", HOST_END)
        for program in ([HTTP_SERVER, str(served)], [DNS_SERVER], [HOLD_SERVER], [UDP_SINK, str(served / "udp.log")]):
            servers.append(subprocess.Popen([*inside, sys.executable, "-c", *program], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        probe = next(iter(files))
        while not _http_ok(f"http://{ADDRESS}:{HTTP_PORT}/{probe}"):
            if time.monotonic() > deadline:
                raise RuntimeError("the outside's HTTP server did not start")
            time.sleep(0.05)
        yield served
    finally:
        for p in servers:
            p.kill()
            p.wait()
        subprocess.run(["ip", "link", "del", "dtout0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        shutil.rmtree(served, ignore_errors=True)


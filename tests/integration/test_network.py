"""The `nat` network mode: a sandbox's own address, the outside through NAT, egress policy, DNS, published ports,
kept across checkpoint, rollback and fork; `host` refused unless allowed.

"The outside" is a network namespace the tests make on this host (bench/outside.py), reached through a veth pair: a
public test range (198.51.100.0/24, where an HTTP server, a DNS server and a connection holder run) and a private one
(172.31.254.0/24, only reachable when a policy allows it). Nothing leaves this machine except in
`test_apt_get_update_with_nat_and_not_without`, which fetches Debian's package index as the issue's proof asks.
"""

import errno
import hashlib
import json
import os
import signal
import socket
import urllib.request

import pytest
from support import new_sandbox, private_daemon, wait_until  # also puts bench/ on the path, for outside

from outside import ADDRESS as OUTSIDE  # noqa: I001
from outside import HOLD_PORT, HTTP_PORT, PRIVATE, UDP_PORT
from outside import HOST_END as OUTSIDE_HOST_END
from outside import outside as outside_namespace

import deltabox

BLOB = os.urandom(1 << 20)

# Run inside a sandbox: connects to each host:port given and prints one JSON line per target with the outcome.
PROBE = r"""
import json, socket, sys, time
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(5)
    start = time.monotonic()
    try:
        s.connect((host, int(port)))
        outcome = "connected"
    except OSError as e:
        outcome = e.errno if e.errno is not None else type(e).__name__
    print(json.dumps({"target": target, "outcome": outcome, "seconds": time.monotonic() - start}))
    s.close()
"""

FETCH = "python3 -c 'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], " \
        "timeout=10).read())' "


@pytest.fixture(scope="module")
def outside():
    """The outside namespace; yields the directory it serves (with `udp.log`)."""
    with outside_namespace({"blob": BLOB, "hello": b"hello from the outside\n"}) as served:
        yield served


def _http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


def probe(sb: deltabox.Sandbox, *targets: str) -> dict:
    if not sb.files.exists("/root/probe.py"):
        sb.files.write("/root/probe.py", PROBE.encode())
    out = sb.exec(["python3", "/root/probe.py", *targets], timeout=60).check().stdout
    return {r["target"]: r for r in map(json.loads, out.splitlines())}


def assert_refused(results: dict) -> None:
    """Each connection was refused or found unreachable at once: never connected, never left hanging."""
    for target, r in results.items():
        assert r["outcome"] in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH), (target, r)
        assert r["seconds"] < 2, (target, r)


def fetch(sb: deltabox.Sandbox, url: str) -> deltabox.ExecResult:
    return sb.exec(FETCH + url, timeout=60)


@pytest.fixture(scope="module")
def nat(client, outside):
    with new_sandbox(client, "debian", network="nat") as sb:
        yield sb


def test_a_nat_sandbox_has_its_own_address_and_reaches_the_outside(nat):
    info = nat.refresh()
    net = nat.network()
    assert info.network == "nat" and net.mode == "nat"
    assert info.address == net.address and net.address.startswith("10.89.")
    addresses = nat.exec("python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))'; "
                         "cat /proc/net/fib_trie").check().stdout
    assert net.address in addresses
    assert nat.files.read_text("/etc/resolv.conf") == f"nameserver {net.gateway}\n"
    got = fetch(nat, f"http://{OUTSIDE}:{HTTP_PORT}/blob").check().stdout_bytes
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(BLOB).hexdigest()


def test_what_a_nat_sandbox_cannot_reach(client, nat):
    """The host (any of its addresses, the link's gateway included), another sandbox, link-local metadata
    addresses and private ranges are refused at once, while each is really there and listening."""
    with socket.socket() as host_server, new_sandbox(client, "debian", network="nat") as other:
        host_server.bind(("0.0.0.0", 0))
        host_server.listen()
        port = host_server.getsockname()[1]
        other.session("main").run("(cd /root && python3 -m http.server 8000 > /dev/null 2>&1 &)").check()
        other_address = other.network().address
        assert wait_until(lambda: probe(other, "127.0.0.1:8000")["127.0.0.1:8000"]["outcome"] == "connected")
        assert probe(nat, f"{OUTSIDE}:{HTTP_PORT}")[f"{OUTSIDE}:{HTTP_PORT}"]["outcome"] == "connected"
        assert_refused(probe(nat, f"{OUTSIDE_HOST_END}:{port}", f"{nat.network().gateway}:{port}",
                             f"{other_address}:8000", f"{other.network().gateway}:{port}", "169.254.169.254:80",
                             f"{PRIVATE}:{HTTP_PORT}", "10.255.255.1:53", "127.0.0.53:53"))


# Sends argv[1] to the outside's UDP sink from a forged source address (a raw socket: the sandbox keeps CAP_NET_RAW),
# then argv[2] from its own.
SPOOF = r"""
import socket, struct, sys
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
src, dst, port = socket.inet_aton("10.89.255.254"), socket.inet_aton(sys.argv[3]), int(sys.argv[4])
payload = sys.argv[1].encode()
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.sendto(header + udp, (sys.argv[3], 0))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[2].encode(), (sys.argv[3], port))
"""


def test_forged_source_addresses_do_not_leave_a_nat_sandbox(nat, outside):
    nat.files.write("/root/spoof.py", SPOOF.encode())
    nat.exec(["python3", "/root/spoof.py", "forged", "genuine", OUTSIDE, str(UDP_PORT)]).check()
    log = outside / "udp.log"
    wait_until(lambda: log.exists() and "genuine" in log.read_text(), what="the genuine datagram")
    lines = log.read_text().splitlines()
    assert f"{OUTSIDE_HOST_END} genuine" in lines, lines
    assert not any("forged" in line for line in lines), lines


def test_names_resolve_through_the_daemon_which_enforces_host_names(outside):
    """The sandbox's resolv.conf names its gateway, where the daemon relays queries to its DNS servers (here the
    outside's, `--dns`). Host names of the egress policy are enforced there: an
    allowed name's addresses become reachable when the sandbox resolves it; a denied name is not resolved."""
    with private_daemon("deltabox-dns-", ["--dns", OUTSIDE]) as d, deltabox.Client(socket=d.socket) as c:
        with new_sandbox(c, "busybox", network="nat") as sb:
            r = sb.exec("nslookup outside.test", timeout=30).check()
            assert OUTSIDE in r.stdout, r.stdout
            assert sb.exec("nslookup missing.test", timeout=30).exit_code != 0
            r = sb.exec(f"wget -q -O - http://outside.test:{HTTP_PORT}/hello", timeout=30).check()
            assert r.stdout == "hello from the outside\n"
        with new_sandbox(c, "busybox", network="nat", deny_out=["0.0.0.0/0"], allow_out=["outside.test"]) as sb:
            by_address = f"wget -q -O - http://{OUTSIDE}:{HTTP_PORT}/hello"
            r = sb.exec(by_address, timeout=30)
            assert r.exit_code != 0 and "refused" in r.stderr, r
            r = sb.exec(f"wget -q -O - http://outside.test:{HTTP_PORT}/hello", timeout=30).check()
            assert r.stdout == "hello from the outside\n"
            assert sb.exec(by_address, timeout=30).check().stdout == "hello from the outside\n"
            sb.set_egress(deny_out=["*.test"])
            r = sb.exec("nslookup outside.test", timeout=30)
            assert r.exit_code != 0 and OUTSIDE not in r.stdout.split("Name:")[-1], r
            # What it resolved before is forgotten with the old policy; by address, only address rules count.
            assert sb.exec(by_address, timeout=30).check().stdout == "hello from the outside\n"
            assert [str(d) for d in sb.network().deny_out] == ["*.test"]


def test_a_restarted_daemon_serves_dns_policy_and_published_ports_again(outside):
    """The relays live in the daemon: after it was killed and started again, the sandbox it reattaches to
    resolves names, keeps its policy, and its published port answers on the same host port."""
    with private_daemon("deltabox-netrestart-", ["--dns", OUTSIDE]) as d, deltabox.Client(socket=d.socket) as c:
        with new_sandbox(c, "busybox", network="nat", deny_out=[PRIVATE]) as sb:
            sb.files.write("/root/www/page", b"served\n")
            sb.exec("httpd -p 8000 -h /root/www").check()
            port = sb.publish_port(8000).host_port
            assert wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/page"))
            d.stop(signal.SIGKILL)
            assert not _http_ok(f"http://127.0.0.1:{port}/page")
            d.start()
            sb = c.sandbox(sb.id)
            assert sb.network().ports[0].host_port == port
            assert _host_get(port) == "served\n"
            assert OUTSIDE in sb.exec("nslookup outside.test", timeout=30).check().stdout
            r = sb.exec(f"wget -q -O - http://{PRIVATE}:{HTTP_PORT}/hello", timeout=30)
            assert r.exit_code != 0 and "refused" in r.stderr, r


def test_the_hosts_network_is_refused_unless_allowed(outside):
    with private_daemon("deltabox-nohost-") as d, deltabox.Client(socket=d.socket) as c:
        with pytest.raises(deltabox.BadRequest) as e:
            c.create("busybox", network="host")
        assert e.value.code == "network_not_allowed"
        with new_sandbox(c, "busybox", network="nat") as sb:
            assert sb.exec("true").exit_code == 0


def test_egress_policy_changes_apply_to_a_running_sandbox_and_pass_to_forks(client, outside):
    url = f"http://{OUTSIDE}:{HTTP_PORT}/hello"
    with new_sandbox(client, "debian", network="nat", allow_out=[f"{PRIVATE}/32"]) as sb:
        assert sb.network().allow_out == [f"{PRIVATE}/32"]
        assert probe(sb, f"{PRIVATE}:{HTTP_PORT}")[f"{PRIVATE}:{HTTP_PORT}"]["outcome"] == "connected"
        # An open connection is cut by a policy that denies its peer.
        session = sb.session("main")
        session.run(f"exec 7<>/dev/tcp/{OUTSIDE}/{HOLD_PORT}").check()
        net = sb.set_egress(deny_out=["198.51.100.0/24"])
        assert (net.allow_out, net.deny_out) == ([], ["198.51.100.0/24"])
        assert_refused(probe(sb, f"{OUTSIDE}:{HTTP_PORT}", f"{PRIVATE}:{HTTP_PORT}"))
        r = session.run("echo x >&7 && sleep 1 && echo y >&7", timeout=30)
        assert r.exit_code != 0
        assert fetch(sb, url).exit_code != 0
        sb.set_egress(deny_out=["0.0.0.0/0"], allow_out=[OUTSIDE])
        assert fetch(sb, url).check().stdout == "hello from the outside\n"
        assert_refused(probe(sb, f"{PRIVATE}:{HTTP_PORT}"))
        ck = sb.checkpoint()
        sb.set_egress()
        assert sb.network().deny_out == []
        (child,) = ck.fork()
        with child:
            net = child.network()
            assert (net.allow_out, net.deny_out) == ([f"{OUTSIDE}/32"], ["0.0.0.0/0"])
            assert fetch(child, url).check().stdout == "hello from the outside\n"
            assert_refused(probe(child, f"{PRIVATE}:{HTTP_PORT}"))


def _host_get(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/page", timeout=10).read().decode()


def test_a_published_port_answers_across_checkpoint_rollback_and_fork(client, outside):
    with new_sandbox(client, "debian", network="nat") as sb:
        sb.files.write("/root/www/page", b"first\n")
        sb.session("main").run("(cd /root/www && python3 -m http.server 8000 > /dev/null 2>&1 &)").check()
        published = sb.publish_port(8000)
        assert published.host_address == "127.0.0.1" and published.port == 8000
        assert sb.network().ports == [published]
        assert wait_until(lambda: _http_ok(f"http://127.0.0.1:{published.host_port}/page"))
        assert _host_get(published.host_port) == "first\n"
        ck = sb.checkpoint()
        sb.files.write("/root/www/page", b"second\n")
        assert _host_get(published.host_port) == "second\n"
        sb.rollback(ck)
        assert _host_get(published.host_port) == "first\n"
        (child,) = ck.fork()
        with child:
            assert child.network().address != sb.network().address
            assert child.network().ports == []
            port = child.publish_port(8000).host_port
            assert _host_get(port) == "first\n"
            assert fetch(child, f"http://{OUTSIDE}:{HTTP_PORT}/hello").check().stdout == "hello from the outside\n"
        with pytest.raises(deltabox.Conflict) as e:
            sb.publish_port(8000)
        assert e.value.code == "port_published"
        sb.unpublish_port(8000)
        assert not _http_ok(f"http://127.0.0.1:{published.host_port}/page")
        with pytest.raises(deltabox.NotFound):
            sb.unpublish_port(8000)


# An echo server bound to the sandbox's own address (not 0.0.0.0), and a client that keeps one connection to it over
# that address, sending a numbered ping every 50 ms and writing each echo it gets to /root/echoes.
OWN_ADDRESS_PROGRAMS = r"""
import socket, sys, threading, time
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("198.51.100.2", 9))  # nothing is sent: this only picks the source address, the sandbox's own
me = probe.getsockname()[0]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((me, 9000))
server.listen()
def serve(conn):
    with conn, conn.makefile("rwb", buffering=0) as f:
        for line in f:
            f.write(b"echo " + line)
threading.Thread(target=lambda: [threading.Thread(target=serve, args=(server.accept()[0],)).start()
                                 for _ in iter(int, 1)], daemon=True).start()
conn = socket.create_connection((me, 9000))
f = conn.makefile("rwb", buffering=0)
i = 0
while True:
    i += 1
    f.write(b"%d\n" % i)
    with open("/root/echoes", "ab") as out:
        out.write(f.readline())
    time.sleep(0.05)
"""


def _echo_count(sb: deltabox.Sandbox) -> int:
    return len(sb.files.read_text("/root/echoes").splitlines()) if sb.files.exists("/root/echoes") else 0


def test_sockets_on_the_sandboxs_own_address_move_with_a_fork(client, outside):
    """A fork has another address: a listener bound to the checkpointed sandbox's address, and a connection between
    two of its processes over it, are moved to the fork's (and back to the original sandbox's, and again for a
    rollback of the fork to the checkpoint it came from, restored from that checkpoint's image)."""
    with new_sandbox(client, "debian", network="nat") as sb:
        sb.files.write("/root/own.py", OWN_ADDRESS_PROGRAMS.encode())
        sb.session("main").run("(python3 /root/own.py > /root/own.log 2>&1 &)").check()
        wait_until(lambda: _echo_count(sb) > 3, what="echoes over the sandbox's own address")
        ck = sb.checkpoint()
        (child,) = ck.fork()
        with child:
            assert child.network().address != sb.network().address
            for box in (child, sb):
                seen = _echo_count(box)
                wait_until(lambda: _echo_count(box) > seen + 3, what="the connection going on")
            port = child.publish_port(9000).host_port
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"from the host\n")
                assert conn.makefile("rb").readline() == b"echo from the host\n"
            assert child.exec("cat /root/own.log").stdout == ""
            child.rollback(ck)
            seen = _echo_count(child)
            wait_until(lambda: _echo_count(child) > seen + 3, what="the connection going on after the rollback")


def test_a_connection_to_the_outside_is_reset_after_rollback(client, outside):
    with new_sandbox(client, "debian", network="nat") as sb:
        session = sb.session("main")
        session.run(f"exec 7<>/dev/tcp/{OUTSIDE}/{HOLD_PORT}").check()
        ck = sb.checkpoint()
        assert len(ck.reset_connections) == 1 and f"-> {OUTSIDE}:{HOLD_PORT}" in ck.reset_connections[0]
        sb.rollback(ck)
        r = sb.session("main", create=False).run("cat <&7; echo status=$?", timeout=30)
        assert r.stdout == "status=1\n" and "Connection reset by peer" in r.stderr, r


def test_bad_network_requests(client, debian, outside):
    with pytest.raises(deltabox.BadRequest):
        client.create("debian", network="nat", allow_out=["example.com/8"])
    with pytest.raises(deltabox.BadRequest) as e:
        client.create("debian", deny_out=["0.0.0.0/0"])
    assert "nat" in e.value.message
    with pytest.raises(deltabox.BadRequest):
        client.create("debian", network="nat", deny_out=["10.0.0.0/33"])
    with pytest.raises(deltabox.BadRequest) as e:
        debian.set_egress(deny_out=["1.2.3.4"])
    assert e.value.code == "not_nat_network"
    with pytest.raises(deltabox.BadRequest):
        debian.publish_port(8000)
    assert debian.network().mode == "none" and debian.network().address is None
    with socket.socket() as taken, new_sandbox(client, "debian", network="nat") as sb:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(deltabox.Conflict) as e:
            sb.publish_port(8000, host_port=taken.getsockname()[1])
        assert e.value.code == "port_unavailable"


def test_apt_get_update_with_nat_and_not_without(client, debian):
    with new_sandbox(client, "debian", network="nat") as sb:
        r = sb.exec("apt-get update", timeout=300)
        assert r.exit_code == 0 and "Reading package lists" in r.stdout, r.stdout + r.stderr
    r = debian.exec("apt-get -o Acquire::Retries=0 update", timeout=300)
    assert "Failed to fetch" in r.stdout + r.stderr or r.exit_code != 0, r.stdout + r.stderr

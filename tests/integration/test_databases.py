"""Database servers with connected clients in the sandbox (issue 17): PostgreSQL (Debian's postgresql, SysV and
anonymous shared memory, POSIX semaphores, a client over TCP and one over its unix socket, in the middle of a
transaction) and Redis (a client and a pub/sub subscriber over TCP). Each: checkpoint, change the data, roll back
20 times, fork 2; every copy continues from the checkpoint's state, through the same client connections."""

import json

import pytest
from support import new_sandbox, wait_until

# Runs the requests /tmp/db/requests/N.json ({"conn": name, "op": ...}) in order on client connections that stay
# open, writing each answer to /tmp/db/answers/N.json.
DRIVER = r"""
import json, os, sys, time
kind = sys.argv[1]
if kind == "postgres":
    import psycopg2
    conns = {
        "tcp": psycopg2.connect(host="127.0.0.1", dbname="postgres", user="postgres", password="secret"),
        "unix": psycopg2.connect(host="/var/run/postgresql", dbname="postgres", user="postgres"),
    }
    def run(req):
        cur = conns[req["conn"]].cursor()
        cur.execute(req["sql"])
        rows = cur.fetchall() if cur.description else None
        if req.get("commit"):
            conns[req["conn"]].commit()
        return rows
else:
    import redis
    client = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    sub = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True).pubsub()
    sub.subscribe("news")
    sub.get_message(timeout=10)
    def run(req):
        if req["op"] == "received":
            msg = sub.get_message(timeout=10)
            while msg is not None and msg["type"] != "message":
                msg = sub.get_message(timeout=10)
            return msg and msg["data"]
        return client.execute_command(*req["op"])
n = 0
while True:
    path = "/tmp/db/requests/%d.json" % n
    if not os.path.exists(path):
        time.sleep(0.01)
        continue
    try:
        answer = {"ok": run(json.load(open(path)))}
    except Exception as e:
        answer = {"error": repr(e)}
    with open("/tmp/db/answers/tmp", "w") as f:
        json.dump(answer, f)
    os.replace("/tmp/db/answers/tmp", "/tmp/db/answers/%d.json" % n)
    n += 1
"""

SETUP = {
    "postgres": (
        "pg_ctlcluster 15 main start && "
        "runuser -u postgres -- psql -qc \"ALTER USER postgres PASSWORD 'secret'\" && "
        "runuser -u postgres -- psql -qc 'CREATE TABLE t (k int PRIMARY KEY, v text)' && "
        "runuser -u postgres -- psql -qc \"INSERT INTO t VALUES (1, 'a')\" && "
        "(runuser -u postgres -- python3 /tmp/db/driver.py postgres > /tmp/db/driver.log 2>&1 &)"
    ),
    "redis": (
        "redis-server --daemonize yes --save '' --appendonly no --port 6379 --bind 127.0.0.1 && "
        "sleep 0.5 && (python3 /tmp/db/driver.py redis > /tmp/db/driver.log 2>&1 &)"
    ),
}


class Driver:
    def __init__(self, sb):
        self.sb = sb
        self.n = 0

    def __call__(self, **request):
        """Runs one request through the driver's connections; returns its answer."""
        self.sb.files.write(f"/tmp/db/requests/{self.n}.json", json.dumps(request).encode())
        path = f"/tmp/db/answers/{self.n}.json"
        wait_until(lambda: self.sb.files.exists(path), timeout=60, what=f"request {self.n}: {request}")
        answer = json.loads(self.sb.files.read_text(path))
        assert "ok" in answer, (request, answer, self.sb.files.read_text("/tmp/db/driver.log"))
        self.n += 1
        return answer["ok"]

    def at(self, n):
        """The same driver in a copy of the sandbox whose driver is at request `n`."""
        other = Driver(self.sb)
        other.n = n
        return other


def start(client, kind):
    sb = new_sandbox(client, "debian", memory="1G")
    sb.exec(["mkdir", "-p", "/tmp/db/requests", "/tmp/db/answers"]).check()
    sb.files.write("/tmp/db/driver.py", DRIVER.encode())
    r = sb.session("main").run(f"chmod -R 777 /tmp/db && {SETUP[kind]}", timeout=120)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return sb, Driver(sb)


def check_copies(sb, ck, at, check):
    """Rolls `sb` back to `ck` 20 times and forks it twice; `check(driver)` verifies each copy, whose driver
    waits for request `at`."""
    for attempt in range(20):
        sb.rollback(ck)
        assert not sb.files.exists(f"/tmp/db/answers/{at}.json"), attempt
        check(Driver(sb).at(at))
    children = ck.fork(2)
    try:
        for child in children:
            check(Driver(child).at(at))
    finally:
        for child in children:
            child.delete()


def test_postgres_transaction_comes_back_open_on_both_connections(client):
    sb, db = start(client, "postgres")
    with sb:
        # An open transaction on the TCP connection; the unix one does not see it.
        db(conn="tcp", sql="UPDATE t SET v = 'in-tx' WHERE k = 1")
        db(conn="tcp", sql="INSERT INTO t VALUES (2, 'tx')")
        assert db(conn="unix", sql="SELECT v FROM t ORDER BY k", commit=True) == [["a"]]
        ck = sb.checkpoint()
        at = db.n
        # Diverge: the transaction commits, another row is written.
        db(conn="tcp", sql="SELECT 1", commit=True)
        db(conn="unix", sql="INSERT INTO t VALUES (3, 'after')", commit=True)
        assert db(conn="unix", sql="SELECT k FROM t ORDER BY k", commit=True) == [[1], [2], [3]]

        def check(d):
            # The transaction is open again: its connection sees its changes, the other does not.
            assert d(conn="tcp", sql="SELECT k, v FROM t ORDER BY k") == [[1, "in-tx"], [2, "tx"]]
            assert d(conn="unix", sql="SELECT k, v FROM t ORDER BY k", commit=True) == [[1, "a"]]
            d(conn="tcp", sql="SELECT 1", commit=True)
            assert d(conn="unix", sql="SELECT k, v FROM t ORDER BY k", commit=True) == [[1, "in-tx"], [2, "tx"]]

        check_copies(sb, ck, at, check)


def test_redis_data_and_subscription_come_back(client):
    sb, db = start(client, "redis")
    with sb:
        db(op=["SET", "k", "before"])
        db(op=["RPUSH", "list", "1", "2"])
        ck = sb.checkpoint()
        at = db.n
        db(op=["SET", "k", "after"])
        db(op=["DEL", "list"])
        assert db(op=["GET", "k"]) == "after"

        def check(d):
            assert d(op=["GET", "k"]) == "before"
            assert d(op=["LRANGE", "list", "0", "-1"]) == ["1", "2"]
            assert d(op=["PUBLISH", "news", "hello"]) == 1
            assert d(op="received") == "hello"

        check_copies(sb, ck, at, check)

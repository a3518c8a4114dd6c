"""A Jupyter kernel (Debian's ipykernel) and a client (jupyter_client) connected to it over ZeroMQ on loopback TCP,
both in the sandbox (issue 17): checkpoint, change the kernel's variables, roll back 20 times, fork 2; every copy's
kernel has the checkpoint's variables, imports and side effects, and answers new cells through the same client
connections."""

import json

import pytest
from support import new_sandbox, wait_until

# Runs the cells /root/cells/N.py in order through one kernel client that stays connected, and writes each
# result to /root/results/N.json: the reply's status and what the cell printed or returned.
DRIVER = r"""
import json, os, time
from jupyter_client import BlockingKernelClient
kc = BlockingKernelClient(connection_file="/root/kernel.json")
kc.load_connection_file()
kc.start_channels()
kc.wait_for_ready(timeout=120)
n = 0
while True:
    cell = "/root/cells/%d.py" % n
    if not os.path.exists(cell):
        time.sleep(0.01)
        continue
    out = []
    def hook(msg):
        content = msg["content"]
        if msg["msg_type"] == "stream":
            out.append(content["text"])
        elif msg["msg_type"] == "execute_result":
            out.append(content["data"]["text/plain"] + "\n")
    reply = kc.execute_interactive(open(cell).read(), output_hook=hook, timeout=120)
    with open("/root/results/tmp", "w") as f:
        json.dump({"status": reply["content"]["status"], "out": "".join(out)}, f)
    os.replace("/root/results/tmp", "/root/results/%d.json" % n)
    n += 1
"""


def run_cell(sb, n, code):
    """Runs `code` as cell number `n` through the driver; returns what it printed."""
    sb.files.write(f"/root/cells/{n}.py", code.encode())
    path = f"/root/results/{n}.json"
    try:
        wait_until(lambda: sb.files.exists(path), timeout=120, what=f"cell {n}")
    except AssertionError:
        logs = sb.exec(["sh", "-c", "tail -20 /root/kernel.log /root/driver.log; ps -eo pid,stat,etime,args"]).stdout
        raise AssertionError(f"cell {n} got no answer:\n{logs}") from None
    result = json.loads(sb.files.read_text(path))
    assert result["status"] == "ok", result
    return result["out"]


@pytest.fixture()
def kernel(client):
    with new_sandbox(client, "debian", memory="1G") as sb:
        sb.files.write("/root/driver.py", DRIVER.encode())
        sh = sb.session("main")
        started = sh.run(
            "cd /root && mkdir -p cells results && python3 -c \"from jupyter_client.connect import "
            "write_connection_file as w; w('/root/kernel.json', ip='127.0.0.1')\" && "
            "(python3 -m ipykernel_launcher -f /root/kernel.json > kernel.log 2>&1 &) && "
            "(python3 driver.py > driver.log 2>&1 &)", timeout=60)
        assert started.exit_code == 0, started.stderr
        assert run_cell(sb, 0, "import math\nx = 1\nprint('ready')") == "ready\n"
        yield sb


def test_kernel_state_comes_back_after_rollback_and_in_forks(kernel):
    sb = kernel
    assert run_cell(sb, 1, "x = 42\nimport fractions\nopen('/root/side.txt', 'w').write('before')\nx") == "42\n"
    ck = sb.checkpoint()
    assert run_cell(sb, 2, "x = 7\nopen('/root/side.txt', 'w').write('after')\nprint(x)") == "7\n"
    check = "print(x, math.pi > 3, fractions.Fraction(1, 3) * 3, open('/root/side.txt').read())"
    for attempt in range(20):
        sb.rollback(ck)
        # The cells run after the checkpoint are gone with the files; the driver waits for cell 2 again.
        assert not sb.files.exists("/root/results/2.json"), attempt
        assert run_cell(sb, 2, check) == "42 True 1 before\n", attempt
        assert run_cell(sb, 3, "x += 1\nx") == "43\n", attempt
    children = ck.fork(2)
    try:
        for child in children:
            assert run_cell(child, 2, check) == "42 True 1 before\n"
            assert run_cell(child, 3, "x *= 2\nx") == "84\n"
    finally:
        for child in children:
            child.delete()

"""The memory of checkpoints' in-memory copies (templates): what each holds (`memory_bytes`), and the budgets that
keep the most recently used ones for fast rollbacks — per sandbox (`template_memory`) and for the daemon
(`deltabox serve --template-memory`); the others restore from their images."""

import uuid

import pytest
from support import image_dir, private_daemon, raw_request, wait_until

import deltabox

MiB = 1 << 20
HELD = 32 * MiB
# Holds HELD bytes of memory, one byte per page set to the generation in /work/gen whenever that changes (then
# /work/done says so), and answers each new token in /work/ask with its generation and whether every page holds it.
REWRITER = f"""
import os, time
size = {HELD}
buf = bytearray(size)
gen, asked = 0, ""

def publish(name, text):
    with open(name + ".tmp", "w") as f:
        f.write(text)
    os.rename(name + ".tmp", name)

def read(name):
    try:
        with open(name) as f:
            return f.read()
    except OSError:
        return ""

while True:
    want = int(read("/work/gen") or gen)
    if want != gen:
        for k in range(0, size, 4096):
            buf[k] = want
        gen = want
        publish("/work/done", str(gen))
    token = read("/work/ask")
    if token and token != asked:
        asked = token
        whole = all(buf[k] == gen for k in range(0, size, 4096)) and buf[1] == 0
        publish("/work/answer", f"{{token}} {{gen}} {{whole}}")
    time.sleep(0.02)
"""


def start_rewriter(sb: deltabox.Sandbox) -> None:
    """Starts the rewriter as a child of the sandbox's init (as a checkpointed agent's processes usually are: its
    checkpoints' templates then have spares), holding generation 1."""
    sb.exec(["mkdir", "-p", "/work"]).check()
    sb.files.write("/work/rw.py", REWRITER.encode())
    sb.files.write("/work/gen", b"1")
    sb.exec(["sh", "-c", "setsid python3 /work/rw.py > /dev/null 2>&1 < /dev/null &"]).check()
    wait_until(lambda: sb.files.read("/work/done") == b"1" if sb.files.exists("/work/done") else False, 30, 0.05,
               "the rewriter to start")


def rewrite(sb: deltabox.Sandbox, gen: int) -> None:
    """Has the rewriter write every page of its memory again (generation ``gen``)."""
    sb.files.write("/work/gen", str(gen).encode())
    wait_until(lambda: sb.files.read("/work/done") == str(gen).encode(), 30, 0.02, f"generation {gen}")


def held_generation(sb: deltabox.Sandbox) -> int:
    """The generation the rewriter's memory holds, from the process itself (not from its files)."""
    token = uuid.uuid4().hex
    sb.files.write("/work/ask", token.encode())

    def answer():
        if not sb.files.exists("/work/answer"):
            return None
        fields = sb.files.read("/work/answer").decode().split()
        return fields if fields[0] == token else None

    _, gen, whole = wait_until(answer, 30, 0.02, "the rewriter's answer")
    assert whole == "True", "its memory is not the one of a single generation"
    return int(gen)


def memory(client: deltabox.Client, ck: deltabox.Checkpoint):
    return client.checkpoint(ck.id).memory_bytes


def test_a_checkpoint_holds_what_its_processes_rewrote_since(client, cli):
    with client.create("debian") as sb:
        start_rewriter(sb)
        files_only = sb.checkpoint(fs_only=True)
        ck = sb.checkpoint()
        fresh = wait_until(lambda: memory(client, ck), 30, 0.1, "a first measurement")
        # Page tables at least; its pages are still the running process's too.
        assert 0 < fresh < HELD / 4
        assert memory(client, files_only) is None
        rewrite(sb, 2)
        grown = wait_until(lambda: (m := memory(client, ck)) > HELD * 0.9 and m, 30, 0.1,
                           "the templates to hold the rewritten pages")
        assert grown < HELD * 1.5
        health = client.health()
        assert health["template_memory_bytes"] >= grown
        assert health["template_memory_budget"] > 0
        info = sb.refresh()
        assert info.template_memory == min(health["template_memory_budget"], info.memory // 2), \
            "the daemon's, at most half the sandbox's memory, by default"
        listing = cli("checkpoints", sb.id).stdout.splitlines()
        assert "MEMORY" in listing[0].split()


def test_a_sandbox_s_default_template_memory_fits_in_its_memory_limit(client):
    # Templates are charged to the sandbox's memory cgroup: past its limit the kernel would kill them.
    with client.create("debian", memory="512M") as sb:
        assert sb.refresh().template_memory == 256 * MiB
    with client.create("debian", memory="512M", template_memory="400M") as sb:
        assert sb.refresh().template_memory == 400 * MiB, "what the user asks for stands"


def test_a_sandbox_over_its_template_memory_drops_its_least_recently_used_checkpoints(client):
    """Three checkpoints each holding HELD (the process rewrote its memory after each) do not fit 2.5 HELD: the
    one least recently used goes — the second taken, as the first was rolled back to since."""
    with client.create("debian", template_memory=f"{HELD * 5 // 2 // MiB}M") as sb:
        assert sb.refresh().template_memory == HELD * 5 // 2
        start_rewriter(sb)
        first = sb.checkpoint()
        rewrite(sb, 2)
        second = sb.checkpoint()
        back = sb.rollback(first)
        assert (back.processes_restored, back.from_image) == (1, False)
        assert held_generation(sb) == 1
        rewrite(sb, 3)
        third = sb.checkpoint()
        rewrite(sb, 4)

        def settled():
            held = [memory(client, ck) for ck in (first, second, third)]
            return held if held[1] == 0 and all(m and m > HELD * 0.9 for m in (held[0], held[2])) else None

        wait_until(settled, 60, 0.2, "the second checkpoint's templates to be dropped, and only them")
        back = sb.rollback(first)
        assert not back.from_image, "kept: restored from memory"
        assert held_generation(sb) == 1 and sb.files.read("/work/gen") == b"1"
        back = sb.rollback(second)
        assert back.from_image, "dropped: restored from its image"
        assert back.processes_restored == 1
        assert held_generation(sb) == 2 and sb.files.read("/work/gen") == b"2"
        rewrite(sb, 5)
        assert held_generation(sb) == 5, "the restored process works on"


def test_a_zero_template_memory_keeps_no_templates_once_written(client):
    with client.create("debian", template_memory=0) as sb:
        start_rewriter(sb)
        ck = sb.checkpoint()
        wait_until(lambda: memory(client, ck) == 0, 30, 0.1, "the templates to be dropped")
        rewrite(sb, 2)
        back = sb.rollback(ck)
        assert back.from_image
        assert held_generation(sb) == 1


def test_a_checkpoint_after_a_rollback_from_the_image_stores_only_what_changed(client):
    # No template shares the restored process's pages: its pages are compared with the image they came from.
    with client.create("debian", template_memory=0) as sb:
        start_rewriter(sb)
        ck = sb.checkpoint()
        wait_until(lambda: memory(client, ck) == 0, 30, 0.1, "the templates to be dropped")
        assert sb.rollback(ck).from_image
        after = sb.checkpoint()
        wait_until(lambda: client.checkpoint(after.id).durable, 30, 0.05, "the image to be written")
        first, second = (client.checkpoint(c.id).disk_bytes for c in (ck, after))
        assert first > HELD, "the first image holds the rewriter's memory"
        assert second < HELD / 4, f"the second holds what changed since: {second} bytes"
        rewrite(sb, 2)
        wait_until(lambda: memory(client, after) == 0, 30, 0.1, "the second checkpoint's templates to be dropped")
        back = sb.rollback(after)
        assert (back.from_image, back.processes_restored) == (True, 1)
        assert held_generation(sb) == 1, "restored through both images"


def test_the_daemon_s_template_memory_drops_the_least_recently_used_of_all_sandboxes():
    """Two sandboxes under a daemon budget of 1.5 HELD, each with a checkpoint holding HELD: the older goes,
    though each fits its own budget (the daemon's, by default)."""
    budget = HELD * 3 // 2
    with private_daemon("deltabox-template-memory-", ["--template-memory", f"{budget // MiB}M"]) as d, \
            deltabox.Client(socket=d.socket) as c:
        c.images.import_(str(image_dir() / "debian"), "debian")
        assert c.health()["template_memory_budget"] == budget
        a, b = c.create("debian"), c.create("debian")
        assert a.refresh().template_memory == budget
        for sb in (a, b):
            start_rewriter(sb)
        older = a.checkpoint()
        newer = b.checkpoint()
        for sb in (a, b):
            rewrite(sb, 2)

        def settled():
            held = memory(c, older), memory(c, newer)
            return held[0] == 0 and held[1] and held[1] > HELD * 0.9

        wait_until(settled, 60, 0.2, "the older checkpoint's templates to be dropped, and only them")
        assert c.health()["template_memory_bytes"] <= budget
        assert a.rollback(older).from_image
        assert held_generation(a) == 1
        assert not b.rollback(newer).from_image
        assert held_generation(b) == 1


@pytest.mark.parametrize("size", ["lots", "-1G", "1e30", [1], 1.5])
def test_a_bad_template_memory_is_refused(daemon, size):
    import json

    status, body = raw_request(daemon, "POST", "/v1/sandboxes",
                               json.dumps({"image": "busybox", "template_memory": size}).encode(),
                               {"Content-Type": "application/json"})
    assert (status, body["error"]) == (400, "invalid_request"), body
    assert "template_memory" in body["message"]

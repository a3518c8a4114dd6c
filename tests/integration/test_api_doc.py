"""Runs every example of docs/api.md against the daemon and compares each answer with the sample after it.

Each ```sh block is run (in order, in one bash, with $SOCK set) and must be followed by a ```json or ```text
sample. JSON output must match the sample's documents — same fields, same values except those that differ
between runs (ids, pids, times, latencies, image digests, whether a process image is written yet, what templates hold
and the host-sized template budget; sandbox and checkpoint ids inside other values, e.g.
messages, are masked), same sequence of event types (repeated progress events count once); text output must
equal the sample (up to trailing newlines).
"""

import itertools
import json
import re
import subprocess

import pytest
from support import REPO

DOC = REPO / "docs" / "api.md"
VOLATILE = {"id", "pid", "created", "duration_ms", "uid_base", "init_pid", "source", "layers", "size", "done_bytes",
            "total_bytes", "mtime", "pause_ms", "fs_ms", "changed_inodes", "durable", "disk_bytes", "memory_bytes",
            "template_memory_bytes", "template_memory_budget", "address", "gateway", "interface", "host_port"}
# Sandbox ids (12 hex digits) and checkpoint ids ("ck-" + 12 hex digits) in any string value.
IDS = re.compile(r"\b(ck-)?[0-9a-f]{12}\b")
EXAMPLE = re.compile(r"```sh\n(.*?)```\s*```(json|text)\n(.*?)```", re.S)
MARK = "@@@example-"


def documents(text):
    """The JSON documents in ``text`` (one per line, or printed back to back by several curl calls)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        out.append(doc)
    return out


def collapse(docs):
    """Consecutive events of the same type (progress, output pieces) count as one."""
    return [next(group) for _, group in itertools.groupby(docs, key=lambda d: d.get("type", id(d)))]


def differences(sample, actual, where="$"):
    if isinstance(sample, dict) and isinstance(actual, dict):
        if set(sample) != set(actual):
            return [f"{where}: fields {sorted(actual)} != documented {sorted(sample)}"]
        return [d for k in sample if k not in VOLATILE for d in differences(sample[k], actual[k], f"{where}.{k}")]
    if isinstance(sample, list) and isinstance(actual, list) and len(sample) == len(actual):
        return [d for i, (s, a) in enumerate(zip(sample, actual)) for d in differences(s, a, f"{where}[{i}]")]
    return [] if masked(sample) == masked(actual) else [f"{where}: {actual!r} != documented {sample!r}"]


def masked(value):
    return IDS.sub(lambda m: f"{m.group(1) or ''}<id>", value) if isinstance(value, str) else value


def test_examples_match_the_daemon(daemon):
    examples = EXAMPLE.findall(DOC.read_text())
    assert len(examples) == DOC.read_text().count("```sh\n"), "every ```sh example needs a sample after it"
    script = [f"SOCK={daemon.socket}"]
    for i, (commands, _, _) in enumerate(examples):
        script.append(f"echo '{MARK}{i}'")
        script.append(commands)
    run = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    outputs = re.split(rf"{MARK}\d+\n", run.stdout)[1:]
    assert len(outputs) == len(examples)
    problems = []
    for (commands, kind, sample), output in zip(examples, outputs):
        if kind == "text":
            # A sample block always ends with a newline; the file shown may not.
            found = [] if output.rstrip("\n") == sample.rstrip("\n") else [f"{output!r} != documented {sample!r}"]
        else:
            expected, got = collapse(documents(sample)), collapse(documents(output))
            found = (differences(expected, got) if len(expected) == len(got)
                     else [f"{len(got)} documents != documented {len(expected)}: {output}"])
        problems += [f"{commands.strip()}\n    {p}" for p in found]
    if problems:
        pytest.fail("docs/api.md does not match the daemon:\n" + "\n".join(problems))

"""Real programs inside a sandbox: python3, git, a script file."""

import hashlib
import json
import textwrap


def test_python_computes(debian):
    program = "import hashlib, json; print(json.dumps([sum(range(10**6)), hashlib.sha256(b'deltabox').hexdigest()]))"
    result = debian.exec(["python3", "-c", program], timeout=60).check()
    assert json.loads(result.stdout) == [sum(range(10**6)), hashlib.sha256(b"deltabox").hexdigest()]


def test_git_init_and_commit(debian):
    script = """
        set -e
        git init -q /work/repo && cd /work/repo
        git config user.email agent@example.com && git config user.name Agent
        printf 'hello\\n' > README && git add README && git commit -qm 'first commit'
        printf 'more\\n' >> README && git commit -qam second
        git log --format=%s
        git status --porcelain
        git show HEAD:README
    """
    result = debian.exec(["bash", "-c", script], timeout=60).check()
    assert result.stdout == "second\nfirst commit\nhello\nmore\n"


def test_python_script_from_a_written_file(debian):
    script = textwrap.dedent("""
        import sys, platform, os
        total = sum(int(a) for a in sys.argv[1:])
        print(f"{platform.python_implementation()} total={total} cwd={os.getcwd()}")
    """)
    debian.exec(["sh", "-c", "mkdir -p /work/app && cat > /work/app/main.py"], stdin=script).check()
    result = debian.exec(["python3", "main.py", "1", "2", "39"], cwd="/work/app", timeout=60).check()
    assert result.stdout == "CPython total=42 cwd=/work/app\n"

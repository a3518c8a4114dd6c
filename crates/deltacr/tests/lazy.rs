//! Memory restored on demand keeps the semantics of anonymous memory: MADV_DONTNEED and MADV_FREE give
//! zeros, munmap and mremap move or drop what was still to come, mprotect, a forked child's own copy,
//! touching everything at once, and exit — with and without background filling, and in a sandbox
//! that restores the image a second time from the first restore's checkpoint.

mod common;

use common::{python, wait_for, PidNs};
use deltacr::image::ImageStore;
use deltacr::{Engine, MemoryRestore};

/// Maps regions of 4 MB with a distinct byte per page, reports their CRCs, waits for `go`, then does
/// to each region what the test checks and reports what it reads.
const PROGRAM: &str = r#"
import ctypes, os, sys, time, zlib
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE, SIZE = 4096, 4 << 20
RW, ANON, FIXED = 3, 0x22, 0x10
DONTNEED, FREE = 4, 8
out = open(sys.argv[1], "a")
go = sys.argv[2]
def say(*a):
    out.write(" ".join(map(str, a)) + "\n"); out.flush()
def region(tag):
    addr = libc.mmap(None, SIZE, RW, ANON, -1, 0)
    for p in range(SIZE // PAGE):
        ctypes.memset(addr + p * PAGE, (p * 7 + tag) % 251 + 1, PAGE)
    return addr
def crc(addr, n=SIZE):
    return zlib.crc32(ctypes.string_at(addr, n))
def zeros(addr, n):
    return ctypes.string_at(addr, n) == bytes(n)
names = ["whole", "dontneed", "free", "remap", "unmap", "protect", "fork", "last"]
regions = {n: region(i) for i, n in enumerate(names)}
for n in names:
    say("crc", n, crc(regions[n]))
say("crc", "dontneed-rest", crc(regions["dontneed"] + SIZE // 2, SIZE // 2))
say("crc", "unmap-rest", crc(regions["unmap"], SIZE // 2))
say("ready")
while not os.path.exists(go):
    time.sleep(0.002)
r = regions
say("after", "whole", crc(r["whole"]))
half = SIZE // 2
libc.madvise(r["dontneed"], half, DONTNEED)
say("dontneed-zero", zeros(r["dontneed"], half))
say("after", "dontneed-rest", crc(r["dontneed"] + half, half))
libc.madvise(r["free"], SIZE, FREE)
ctypes.memset(r["free"], 0x5a, PAGE)
pages = [ctypes.string_at(r["free"] + p * PAGE, PAGE) for p in range(1, SIZE // PAGE)]
say("free-page0", ctypes.string_at(r["free"], PAGE) == b"\x5a" * PAGE)
say("free-rest-whole-pages", all(pg == bytes(PAGE) or len(set(pg)) == 1 for pg in pages))
new = libc.mremap(r["remap"], SIZE, SIZE, 3, 0x3a0000000000)
say("remapped", new == 0x3a0000000000)
say("after", "remap", crc(new))
libc.munmap(r["unmap"] + half, half)
again = libc.mmap(r["unmap"] + half, half, RW, ANON | FIXED, -1, 0)
say("unmap-new-zero", again == r["unmap"] + half and zeros(again, half))
say("after", "unmap-rest", crc(r["unmap"], half))
libc.mprotect(r["protect"], SIZE, 1)
say("after", "protect", crc(r["protect"]))
pid = os.fork()
if pid == 0:
    c = crc(r["fork"])
    ctypes.memset(r["fork"], 0x11, PAGE)
    say("child", c, crc(r["whole"]))
    out.close()
    os._exit(0)
os.waitpid(pid, 0)
say("after", "fork", crc(r["fork"]))
say("after", "last", crc(r["last"]))
say("done")
"#;

fn lines(path: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect()
}

fn value<'a>(all: &'a [Vec<String>], key: &[&str]) -> &'a str {
    let l = all
        .iter()
        .find(|l| l.len() > key.len() && l.iter().zip(key).all(|(a, b)| a == b))
        .unwrap_or_else(|| panic!("no line {key:?} in {all:?}"));
    &l[key.len()]
}

/// Checks what the program reported after the restore against what it reported before.
fn check(out: &std::path::Path, skip: usize) {
    let all = lines(out);
    let (before, after) = all.split_at(skip);
    let crc = |n: &str| value(before, &["crc", n]).to_string();
    assert_eq!(value(after, &["after", "whole"]), crc("whole"));
    assert_eq!(value(after, &["dontneed-zero"]), "True", "MADV_DONTNEED gives zeros");
    assert_eq!(value(after, &["free-page0"]), "True", "a page written after MADV_FREE keeps what was written");
    assert_eq!(value(after, &["free-rest-whole-pages"]), "True", "MADV_FREE pages read old or zero, whole");
    assert_eq!(value(after, &["remapped"]), "True");
    assert_eq!(value(after, &["after", "remap"]), crc("remap"), "mremap moves what was still to come");
    assert_eq!(value(after, &["unmap-new-zero"]), "True", "a new mapping where one was unmapped reads zeros");
    assert_eq!(value(after, &["after", "protect"]), crc("protect"), "read-only memory comes back");
    assert_eq!(value(after, &["child"]), crc("fork"), "a fork's child reads the parent's memory");
    assert_eq!(value(after, &["child", &crc("fork")]), crc("whole"));
    assert_eq!(value(after, &["after", "fork"]), crc("fork"), "the child wrote its own copy");
    assert_eq!(value(after, &["after", "last"]), crc("last"));
    assert_eq!(value(after, &["after", "dontneed-rest"]), crc("dontneed-rest"), "what was not dropped stays");
    assert_eq!(value(after, &["after", "unmap-rest"]), crc("unmap-rest"), "what was not unmapped stays");
}

fn run(mode: MemoryRestore) {
    let on_demand = matches!(mode, MemoryRestore::OnDemand { .. });
    if on_demand && deltacr::lazy::open_device().is_err() {
        return testing::skip("no /dev/userfaultfd (Linux 6.1+): restores copy memory whole");
    }
    let mut ns = PidNs::new();
    let (out, go) = (ns.path("out"), ns.path("go"));
    let py = python();
    let (pid, _) = ns.spawn(&[&py, "-c", PROGRAM, out.to_str().unwrap(), go.to_str().unwrap()], None, false);
    wait_for(|| lines(&out).iter().any(|l| l[0] == "ready").then_some(()));
    let store = ImageStore::new(&ns.path("images")).unwrap();
    let mut engine = Engine::new();
    engine.set_memory_restore(mode);
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let image = ckpt.image_job(None).unwrap().write(&store).unwrap().id;
    drop(ckpt);
    engine.kill_processes(&sb).unwrap();

    let skip = lines(&out).len();
    let stats = engine.restore_image(store.open_chain(image).unwrap(), &sb, None).unwrap();
    // Eight 4 MiB regions and the interpreter's heap.
    assert_eq!(stats.on_demand_bytes >= 32 << 20, on_demand, "left on demand: {}", stats.on_demand_bytes);
    // A checkpoint of the lazily restored process (its memory is completed first) restores whole.
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let again = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    let second = again.image_job(None).unwrap().write(&store).unwrap().id;
    drop(again);
    std::fs::write(&go, "").unwrap();
    wait_for(|| lines(&out)[skip..].iter().any(|l| l[0] == "done").then_some(()));
    check(&out, skip);

    // Again from the second image, touching memory right away (no checkpoint in between).
    std::fs::remove_file(&go).unwrap();
    engine.kill_processes(&sb).unwrap();
    let skip_second = lines(&out).len();
    let stats = engine.restore_image(store.open_chain(second).unwrap(), &sb, None).unwrap();
    assert_eq!(stats.on_demand_bytes >= 32 << 20, on_demand, "left on demand: {}", stats.on_demand_bytes);
    // Other processes read its arguments and environment (ps, pgrep -f), which it never touches itself.
    let host = ns.host_pid(pid);
    let cmdline = std::fs::read(format!("/proc/{host}/cmdline")).unwrap();
    let environ = std::fs::read(format!("/proc/{host}/environ")).unwrap();
    let shown = String::from_utf8_lossy(&cmdline).into_owned();
    assert!(shown.contains(out.to_str().unwrap()) && !environ.is_empty(), "{host}: {shown:?}");
    std::fs::write(&go, "").unwrap();
    wait_for(|| lines(&out)[skip_second..].iter().any(|l| l[0] == "done").then_some(()));
    let all = lines(&out);
    let mut replay = all[..skip].to_vec();
    replay.extend_from_slice(&all[skip_second..]);
    let path = ns.path("replay");
    std::fs::write(&path, replay.iter().map(|l| l.join(" ") + "\n").collect::<String>()).unwrap();
    check(&path, skip);
}

#[test]
fn memory_restored_on_demand_behaves_as_anonymous_memory() {
    run(MemoryRestore::OnDemand { background_fill: false });
}

#[test]
fn memory_filled_in_the_background_behaves_as_anonymous_memory() {
    run(MemoryRestore::OnDemand { background_fill: true });
}

#[test]
fn memory_copied_whole_behaves_as_anonymous_memory() {
    run(MemoryRestore::Copy);
}

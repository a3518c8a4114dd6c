//! What a checkpoint's templates hold in memory: the pages the live process rewrote since, also once the
//! templates have spares (which share those pages with them), plus their page tables.

mod common;

use std::io::{BufRead, BufReader, Write};

use common::{python, PidNs};
use deltacr::Engine;

/// Holds MIB MiB of written memory; each line on the command FIFO rewrites all of it, then it answers.
const REWRITER: &str = r#"
import sys
size = int(sys.argv[1]) << 20
buf = bytearray(size)
cmd, ack = open(sys.argv[2]), open(sys.argv[3], "w")
v = 0
for line in iter(cmd.readline, ""):
    v += 1
    for k in range(0, size, 4096):
        buf[k] = v
    ack.write("ok\n"); ack.flush()
"#;
const MIB: u64 = 32;

#[test]
fn a_checkpoint_holds_what_its_process_rewrote_since() {
    let mut ns = PidNs::new();
    let (cmd, ack) = (ns.path("cmd"), ns.path("ack"));
    for fifo in [&cmd, &ack] {
        nix::unistd::mkfifo(fifo.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    let args = [MIB.to_string(), cmd.to_str().unwrap().into(), ack.to_str().unwrap().into()];
    ns.spawn(&[&python(), "-c", REWRITER, &args[0], &args[1], &args[2]], None, false);
    let mut commands = std::fs::OpenOptions::new().write(true).open(&cmd).unwrap();
    let mut answers = BufReader::new(std::fs::File::open(&ack).unwrap());
    let mut rewrite = || {
        commands.write_all(b"go\n").unwrap();
        let mut line = String::new();
        answers.read_line(&mut line).unwrap();
        assert_eq!(line, "ok\n");
    };
    rewrite();

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let size = MIB << 20;
    let fresh = ckpt.memory_bytes().unwrap();
    assert!(fresh > 0, "page tables at least");
    assert!(fresh < size / 4, "right after the checkpoint its pages are the live process's too: {fresh}");

    rewrite();
    let alone = ckpt.memory_bytes().unwrap();
    assert!(alone.abs_diff(size) < size / 5, "{alone} bytes after the process rewrote {size}");
    // The spare maps the template's pages too: the two hold them, counted once, plus the spare's page tables.
    assert_eq!(engine.prepare_spares(&ckpt, &sb).unwrap(), 1);
    let with_spare = ckpt.memory_bytes().unwrap();
    assert!(with_spare.abs_diff(size) < size / 5, "{with_spare} bytes with a spare");
    assert!(with_spare > fresh, "{with_spare} bytes with a spare, {fresh} when fresh");
    drop(ckpt);
}

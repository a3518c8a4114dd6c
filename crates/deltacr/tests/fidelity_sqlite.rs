//! Fidelity: sqlite in WAL mode in the middle of a transaction (its -shm file is mapped MAP_SHARED and
//! it holds POSIX locks). The test puts the database files back as they were at the checkpoint (what
//! DeltaFS does in a sandbox) before each restore; after the restore the transaction still holds its
//! locks (another writer gets "database is locked") and commits what it had plus the rest.

mod common;

use std::process::Command;

use common::{python, wait_for, wait_for_content, PidNs};
use deltacr::Engine;

const TX: &str = r#"
import os, sqlite3, sys, time
db, out, flag = sys.argv[1], open(sys.argv[2], "a"), sys.argv[3]
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS t(x)")
con.execute("INSERT INTO t VALUES (1)")
con.execute("BEGIN")
con.execute("INSERT INTO t VALUES (2)")
out.write("in-tx\n")
out.flush()
while not os.path.exists(flag):
    time.sleep(0.005)
con.execute("INSERT INTO t VALUES (3)")
con.execute("COMMIT")
out.write("rows %s\n" % [r[0] for r in con.execute("SELECT x FROM t ORDER BY x")])
out.flush()
time.sleep(100)
"#;

const OTHER_WRITER: &str = r#"
import sqlite3, sys
try:
    sqlite3.connect(sys.argv[1], timeout=0).execute("INSERT INTO t VALUES (9)")
    print("wrote")
except sqlite3.OperationalError as e:
    print(e)
"#;

#[test]
fn sqlite_mid_transaction_keeps_its_locks_and_commits() {
    let mut ns = PidNs::new();
    let db = ns.path("db");
    let out = ns.path("out");
    let flag = ns.path("flag");
    let py = python();
    ns.spawn(&[&py, "-c", TX, db.to_str().unwrap(), out.to_str().unwrap(), flag.to_str().unwrap()], None, false);
    wait_for_content(&out, "in-tx\n");
    let other_writer = || {
        let o = Command::new(&py).args(["-c", OTHER_WRITER, db.to_str().unwrap()]).output().unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(other_writer(), "database is locked\n");

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let files: Vec<(std::path::PathBuf, Vec<u8>)> =
        ["db", "db-wal", "db-shm"].iter().map(|n| (ns.path(n), std::fs::read(ns.path(n)).unwrap())).collect();
    std::fs::write(&flag, "").unwrap();
    wait_for_content(&out, "rows [1, 2, 3]");

    for _ in 0..2 {
        engine.kill_processes(&sb).unwrap();
        // The filesystem rollback DeltaFS does: same inodes, checkpoint-time contents.
        for (path, data) in &files {
            std::fs::write(path, data).unwrap();
        }
        std::fs::remove_file(&flag).unwrap();
        std::fs::write(&out, "").unwrap();
        engine.restore(&ckpt, &sb).unwrap();
        assert_eq!(other_writer(), "database is locked\n", "the restored transaction holds its locks");
        std::fs::write(&flag, "").unwrap();
        wait_for(|| (std::fs::read_to_string(&out).unwrap() == "rows [1, 2, 3]\n").then_some(()));
    }
}

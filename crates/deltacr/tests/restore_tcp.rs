//! Established TCP connections between processes of the tree (loopback) come back with their queued
//! data in both directions, from templates and from an image; a connection to outside is refused.

mod common;

use common::{number_rows, python, PidNs};
use deltacr::Engine;

/// A client streams numbered 1000-byte lines to a server through a TCP connection on 127.0.0.1 while
/// reading the server's answers; the server checks each line follows the previous one and answers
/// "n ok", pausing every 50 lines so that both directions have queued data. The client appends the
/// answers to argv[1]: any byte lost, repeated or reordered shows as a gap or an ok of 0. The server
/// keeps listening, so the accepted connection's address is the listener's.
const STREAM: &str = r#"
import os, socket, sys, threading, time
out = open(sys.argv[1], "a")
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]
if os.fork() == 0:
    # The listener stays open: the accepted connection has its address.
    conn, _ = srv.accept()
    f = conn.makefile("rb")
    expect = 1
    while True:
        line = f.readline()
        n = int(line.split()[0])
        ok = int(n == expect and len(line) == 1000)
        expect = n + 1
        conn.sendall(b"%d %d\n" % (n, ok))
        if n % 50 == 0:
            time.sleep(0.1)
srv.close()
c = socket.create_connection(("127.0.0.1", port))
def send():
    n = 0
    while True:
        n += 1
        c.sendall(b"%d " % n + b"x" * (999 - len(b"%d " % n)) + b"\n")
        time.sleep(0.001)
threading.Thread(target=send, daemon=True).start()
for line in c.makefile("rb"):
    out.write(line.decode())
    out.flush()
"#;

/// What STREAM writes for line `n`: the line number and the server's verdict.
fn answered(n: u64) -> Vec<u64> {
    vec![n, 1]
}

#[test]
fn tcp_connections_inside_the_tree_continue_with_their_queued_data() {
    let mut c = common::run_and_checkpoint(STREAM, 120, answered);
    let conns: Vec<_> = c
        .ckpt
        .tree
        .files
        .iter()
        .filter_map(|f| match &f.kind {
            deltacr::state::FileKind::TcpConnection { conn, .. } => Some(conn),
            _ => None,
        })
        .collect();
    assert_eq!(conns.len(), 2, "both ends");
    let queued: usize = conns.iter().map(|c| c.send_queue.len() + c.recv_queue.len()).sum();
    assert!(queued > 0, "data was queued at the checkpoint");
    // The connection goes on after the checkpoint (repair mode was left without losing a byte).
    common::rows_follow(&c.out, 0, 120, answered);
    let (out, at) = (c.out.clone(), c.at);
    common::restores_continue(
        &mut c.engine,
        &c.ns,
        &c.ckpt,
        3,
        at,
        || number_rows(&out).len(),
        |from| common::rows_follow(&out, from, 120, answered),
    );
}

#[test]
fn a_connection_to_outside_comes_back_reset_and_the_program_sees_it() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port().to_string();
    let py = python();
    // Reads from a server outside the tree; reports how the connection ended.
    let program = r#"
import socket, sys
out = open(sys.argv[1], "a")
c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
out.write("connected\n")
out.flush()
try:
    data = c.recv(100)
    out.write("read %r\n" % data)
except OSError as e:
    out.write("error %s\n" % type(e).__name__)
out.flush()
"#;
    ns.spawn(&[&py, "-c", program, out.to_str().unwrap(), &port], None, false);
    let (_conn, _) = server.accept().unwrap();
    common::wait_for_content(&out, "connected\n");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    assert_eq!(ckpt.reset_connections().len(), 1, "{:?}", ckpt.reset_connections());
    engine.kill_processes(&sb).unwrap();
    std::fs::write(&out, "").unwrap();
    engine.restore(&ckpt, &sb).unwrap();
    // The restored read fails as on a connection the peer reset.
    common::wait_for_content(&out, "error ConnectionResetError\n");
}

#[test]
fn a_connection_its_outside_peer_closed_comes_back_with_its_unread_bytes_then_end_of_file() {
    let mut ns = PidNs::new();
    let (out, flag) = (ns.path("out"), ns.path("flag"));
    let py = python();
    // A server accepts a connection from outside and reads it only once the flag exists.
    let program = r#"
import os, socket, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
open(sys.argv[1], "w").write("port %d\n" % srv.getsockname()[1])
conn, _ = srv.accept()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
data = b""
while True:
    chunk = conn.recv(100)
    if not chunk:
        break
    data += chunk
open(sys.argv[1], "a").write("read %s then eof\n" % data.decode())
time.sleep(100)
"#;
    ns.spawn(&[&py, "-c", program, out.to_str().unwrap(), flag.to_str().unwrap()], None, false);
    let port: u16 = common::wait_for_content(&out, "\n").trim().strip_prefix("port ").unwrap().parse().unwrap();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut client, b"hello").unwrap();
    drop(client);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    let listed = ckpt.reset_connections();
    assert!(listed.len() == 1 && listed[0].ends_with("(closed by its peer)"), "{listed:?}");
    engine.kill_processes(&sb).unwrap();
    std::fs::write(&out, "").unwrap();
    engine.restore(&ckpt, &sb).unwrap();
    std::fs::write(&flag, "").unwrap();
    common::wait_for_content(&out, "read hello then eof\n");
}

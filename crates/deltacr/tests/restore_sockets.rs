//! Sockets: python's http.server keeps listening after a restore and answers, also when a client outside
//! the tree was connected at the checkpoint (its connection comes back reset: the server goes on).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{python, wait_for, PidNs};
use deltacr::Engine;

fn get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn http_server_answers_after_restore_with_a_connection_to_outside_reset() {
    let mut ns = PidNs::new();
    let dir = ns.path("www");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello from the sandbox").unwrap();
    // A free port: bind, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let py = python();
    let port_s = port.to_string();
    let args = [py.as_str(), "-m", "http.server", &port_s, "--bind", "127.0.0.1", "--directory", dir.to_str().unwrap()];
    ns.spawn(&args, None, false);
    wait_for(|| get(port).filter(|b| b.contains("hello from the sandbox")));

    let mut engine = Engine::new();
    let sb = ns.sandbox();

    // A client connected to the server: the server holds an established connection to outside the tree,
    // which is checkpointed and listed as reset at restore.
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    let reset = ckpt.reset_connections();
    assert_eq!(reset.len(), 1, "{reset:?}");
    assert!(reset[0].contains(&format!("TCP 127.0.0.1:{port} -> 127.0.0.1:{client_port}")), "{reset:?}");
    for _ in 0..2 {
        engine.kill_processes(&sb).unwrap();
        assert!(get(port).is_none(), "nothing listens after the kill");
        engine.restore(&ckpt, &sb).unwrap();
        let body = wait_for(|| get(port));
        assert!(body.contains("200 OK") && body.contains("hello from the sandbox"), "{body}");
    }
}

const UNIX: &str = r#"
import os, socket, sys, time
out = open(sys.argv[1], "a")
flag, path = sys.argv[2], sys.argv[3]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(4)
a.sendall(b"queued-stream")
c.send(b"m1")
c.send(b"m2")
out.write("ready\n")
out.flush()
while not os.path.exists(flag):
    time.sleep(0.005)
out.write("stream %s\n" % b.recv(100).decode())
out.write("dgram %s %s\n" % (d.recv(10).decode(), d.recv(10).decode()))
cl, _ = srv.accept()
out.write("accepted %s\n" % cl.recv(100).decode())
out.flush()
time.sleep(100)
"#;

const UNIX_EXPECTED: &str = "stream queued-stream\ndgram m1 m2\naccepted hi\n";

#[test]
fn unix_socket_pairs_listeners_and_queued_data_come_back() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let flag = ns.path("flag");
    let sock = ns.path("sock");
    let py = python();
    let args = [py.as_str(), "-c", UNIX, out.to_str().unwrap(), flag.to_str().unwrap(), sock.to_str().unwrap()];
    ns.spawn(&args, None, false);
    common::wait_for_content(&out, "ready\n");
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let talk = || {
        std::fs::write(&flag, "").unwrap();
        let mut s = wait_for(|| std::os::unix::net::UnixStream::connect(&sock).ok());
        s.write_all(b"hi").unwrap();
        common::wait_for_content(&out, "accepted");
    };
    talk();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("ready\n{UNIX_EXPECTED}"));
    for _ in 0..2 {
        engine.kill_processes(&sb).unwrap();
        std::fs::remove_file(&flag).unwrap();
        std::fs::write(&out, "").unwrap();
        engine.restore(&ckpt, &sb).unwrap();
        talk();
        wait_for(|| (std::fs::read_to_string(&out).unwrap() == UNIX_EXPECTED).then_some(()));
    }
}

#[test]
fn a_udp_socket_with_unread_datagrams_is_refused_then_checkpointed_once_they_are_read() {
    let mut ns = PidNs::new();
    let (out, flag) = (ns.path("out"), ns.path("flag"));
    let program = r#"
import os, socket, sys, time
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a.bind(("127.0.0.1", 0))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b.sendto(b"datagram", a.getsockname())
open(sys.argv[1], "w").write("sent\n")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
open(sys.argv[1], "a").write("read %s\n" % a.recv(100).decode())
time.sleep(100)
"#;
    let py = python();
    ns.spawn(&[&py, "-c", program, out.to_str().unwrap(), flag.to_str().unwrap()], None, false);
    common::wait_for_content(&out, "sent\n");
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let err = engine.checkpoint(&sb, &mut frozen).err().expect("a queued datagram is refused");
    drop(frozen);
    let msg = format!("{err:?}");
    assert!(err.is_unsupported() && msg.contains("UDP socket 127.0.0.1:") && msg.contains("8 bytes"), "{msg}");
    std::fs::write(&flag, "").unwrap();
    common::wait_for_content(&out, "read datagram\n");
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    engine.checkpoint(&sb, &mut frozen).unwrap();
}

#[test]
fn unix_queues_that_cannot_be_walked_are_refused_and_unconnected_sockets_checkpointed() {
    // A seqpacket pair whose peer shut it down (recv answers 0 for ever), a datagram pair with an empty message
    // queued (the peek offset never moves past it): each refused at once, never a checkpoint that spins. An
    // unconnected stream socket (nothing to peek at: ENOTCONN) is checkpointed.
    for (case, expected) in [("shutdown", "end of the stream"), ("empty", "an empty message"), ("unconnected", "")] {
        let mut ns = PidNs::new();
        let out = ns.path("out");
        let program = r#"
import socket, sys, time
case = sys.argv[2]
if case == "shutdown":
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.shutdown(socket.SHUT_WR)
elif case == "empty":
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.send(b"")
else:
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
open(sys.argv[1], "w").write("ready\n")
time.sleep(100)
"#;
        let py = python();
        ns.spawn(&[&py, "-c", program, out.to_str().unwrap(), case], None, false);
        common::wait_for_content(&out, "ready\n");
        let mut engine = Engine::new();
        let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
        let result = engine.checkpoint(&ns.sandbox(), &mut frozen);
        drop(frozen);
        match result {
            Ok(_) => assert!(expected.is_empty(), "{case}: checkpointed"),
            Err(err) => {
                let msg = format!("{err:?}");
                assert!(!expected.is_empty() && err.is_unsupported() && msg.contains(expected), "{case}: {msg}");
            }
        }
    }
}

#[test]
fn socket_options_a_program_set_come_back() {
    // A listener, both ends of a loopback connection and a UDP socket, each with options set: after a restore
    // (from templates and from an image) each reads back what it had.
    let mut ns = PidNs::new();
    let (out, flag) = (ns.path("out"), ns.path("flag"));
    let program = r#"
import os, socket, sys, time
T, S, I = socket.IPPROTO_TCP, socket.SOL_SOCKET, socket.IPPROTO_IP
IP_RECVERR, SO_TIMESTAMP = 11, 29  # not in python's socket module
listener = socket.socket()
listener.setsockopt(S, socket.SO_REUSEADDR, 1)
listener.setsockopt(T, socket.TCP_DEFER_ACCEPT, 7)
listener.setsockopt(S, socket.SO_PRIORITY, 4)
listener.bind(("127.0.0.1", 0))
listener.listen()
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
for opt, value in ((socket.TCP_KEEPIDLE, 77), (socket.TCP_KEEPINTVL, 11), (socket.TCP_KEEPCNT, 3),
                   (socket.TCP_USER_TIMEOUT, 5000), (socket.TCP_NODELAY, 1)):
    client.setsockopt(T, opt, value)
client.setsockopt(S, socket.SO_KEEPALIVE, 1)
client.setsockopt(I, socket.IP_TOS, 0x10)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(I, socket.IP_MULTICAST_TTL, 7)
udp.setsockopt(I, IP_RECVERR, 1)
udp.setsockopt(S, SO_TIMESTAMP, 1)
def show():
    values = [listener.getsockopt(T, socket.TCP_DEFER_ACCEPT), listener.getsockopt(S, socket.SO_PRIORITY)]
    values += [client.getsockopt(T, o) for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT,
                                                 socket.TCP_USER_TIMEOUT, socket.TCP_NODELAY)]
    values += [client.getsockopt(S, socket.SO_KEEPALIVE), client.getsockopt(I, socket.IP_TOS)]
    values += [udp.getsockopt(I, socket.IP_MULTICAST_TTL), udp.getsockopt(I, IP_RECVERR),
               udp.getsockopt(S, SO_TIMESTAMP)]
    client.sendall(b"x")
    return "%s %s\n" % (values, server.recv(1))
open(sys.argv[1], "w").write("ready " + show())
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
try:
    open(sys.argv[1], "a").write("after " + show())
except Exception as e:
    open(sys.argv[1], "a").write("after %r\n" % e)
time.sleep(100)
"#;
    let py = python();
    ns.spawn(&[&py, "-c", program, out.to_str().unwrap(), flag.to_str().unwrap()], None, false);
    common::wait_for_content(&out, "ready ");
    let expected = "[7, 4, 77, 11, 3, 5000, 1, 1, 16, 7, 1, 1] b'x'\n";
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("ready {expected}"));
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    let store = deltacr::image::ImageStore::new(&ns.path("images")).unwrap();
    let image = ckpt.image_job(None).unwrap().write(&store).unwrap();
    for from_image in [false, true] {
        engine.kill_processes(&sb).unwrap();
        std::fs::write(&out, "").unwrap();
        if from_image {
            engine.restore_image(store.open_chain(image.id).unwrap(), &sb, None).unwrap();
        } else {
            engine.restore(&ckpt, &sb).unwrap();
        }
        std::fs::write(&flag, "").unwrap();
        wait_for(|| std::fs::read_to_string(&out).unwrap().contains("after").then_some(()));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("after {expected}"), "from the image: {from_image}");
        std::fs::remove_file(&flag).unwrap();
    }
}

//! The sidecar's event loop sleeps in the vendored mio (`vendor/mio-trellis.patch`) in
//! `poll(2)` on its epoll instance rather than in `epoll_wait`, so that socket wake-ups do not
//! pull it onto the writer's CPU. Which CPU it wakes on is measured in the
//! load benchmarks; what these check is that a sleeping single-threaded runtime, the kind
//! every sidecar runs, still wakes for each reason it can sleep on: a socket becoming
//! readable, a task handed to it from another thread, and a timer alone.

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Runs `f` on a fresh current-thread runtime in its own thread and fails the test (rather
/// than hanging it) if the runtime never wakes to finish.
fn on_runtime<T: Send + 'static>(name: &str, f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static) -> T {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        // A short event interval: the runtime turns to its event loop every 8 tasks, so the
        // tests go through the patched poll often.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().event_interval(8).build().unwrap();
        let _ = done.send(f(&rt));
        drop(rt);
    });
    finished.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{name}: the runtime never woke up"))
}

#[test]
fn a_sleeping_runtime_wakes_when_a_socket_becomes_readable() {
    let got = on_runtime("socket", |rt| {
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // The peer connects and writes only after the runtime has gone to sleep in accept
            // and then in read: each is a wake-up from a socket alone.
            let peer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                s.write_all(b"ping").unwrap();
                s
            });
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.unwrap();
            drop(peer.join().unwrap());
            buf
        })
    });
    assert_eq!(&got, b"ping");
}

#[test]
fn a_sleeping_runtime_wakes_for_work_sent_from_another_thread() {
    let got = on_runtime("cross-thread", |rt| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(42u32).unwrap();
        });
        rt.block_on(rx).unwrap()
    });
    assert_eq!(got, 42);
}

#[test]
fn a_sleeping_runtime_wakes_for_a_timer_with_nothing_else_to_do() {
    let slept = on_runtime("timer", |rt| {
        rt.block_on(async {
            let start = tokio::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(30)).await;
            start.elapsed()
        })
    });
    assert!(slept >= Duration::from_millis(30), "{slept:?}");
}

/// The patch only works if Cargo uses it: a tokio update that needs another mio version would
/// make Cargo build the registry's mio and merely warn that the `[patch]` went unused.
#[test]
fn mio_is_the_vendored_one() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let entry = lock.split("[[package]]").find(|p| p.contains("\nname = \"mio\"\n")).expect("mio in Cargo.lock");
    assert!(!entry.contains("source = "), "mio comes from a registry, not vendor/mio:{entry}");
    // And the vendored copy carries the patch (a re-vendored mio without it passes the tests
    // above: they check that events arrive, which upstream mio does too).
    let epoll = concat!(env!("CARGO_MANIFEST_DIR"), "/../vendor/mio/src/sys/unix/selector/epoll.rs");
    let source = std::fs::read_to_string(epoll).unwrap();
    assert!(source.contains("Trellis patch") && source.contains("syscall!(poll("), "{epoll} is not patched");
}

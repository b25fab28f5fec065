//! Whole sessions, over the in-memory backend and over loopback TCP (io_uring and blocking):
//! pages in on one end, the same memory out on the other, and every failure reported on both
//! ends with its channel and cause.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pagecodec::{MemoryImage, MemoryLayout, PAGE_SIZE, Page, PageAddr, PageSink, SinkError};
use pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY;
use pagestream_transport::control::AcceptLimits;
use pagestream_transport::memory::FaultPlan;
use pagestream_transport::net::Log;
use pagestream_transport::{
    Acceptor, Connector, PageSource, ReceiveSummary, ReceiverConfig, ReceiverEvent, SendSummary,
    Sender, SenderConfig, TcpAcceptor, TcpBackend, TcpConnector, TransportError, accept,
    memory_network,
};

/// A log that remembers its lines, so tests can check what was said.
fn recording_log() -> (Log, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let log: Log = Arc::new(move |line: &str| sink.lock().unwrap().push(line.to_string()));
    (log, lines)
}

/// Guest memory with zero, text-like, repeating and random pages, deterministic from `seed`.
fn guest(layout: &MemoryLayout, seed: u64) -> MemoryImage {
    let mut image = MemoryImage::zeroed(layout.clone());
    let addrs: Vec<PageAddr> = image.addresses().collect();
    let mut x = seed | 1;
    for addr in addrs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = image.page_mut(addr).unwrap();
        match x % 5 {
            0 => {}
            1 => {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = b"migrate the pages quickly "[(i + addr.index as usize) % 26];
                }
            }
            2 => page.fill((x >> 8) as u8 % 4),
            _ => {
                let mut y = x;
                for chunk in page.chunks_exact_mut(8) {
                    y = y
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    chunk.copy_from_slice(&y.to_le_bytes());
                }
            }
        }
    }
    image
}

/// The guest writes to every `stride`-th page.
fn dirty(image: &mut MemoryImage, stride: u64, salt: u8) -> Vec<PageAddr> {
    let addrs: Vec<PageAddr> = image
        .addresses()
        .filter(|a| a.index % stride == 0)
        .collect();
    for &addr in &addrs {
        let page = image.page_mut(addr).unwrap();
        page[(addr.index as usize * 8) % PAGE_SIZE] ^= salt;
    }
    addrs
}

struct Outcome {
    sent: Result<SendSummary, TransportError>,
    received: Result<ReceiveSummary, TransportError>,
    image: Option<MemoryImage>,
    source: MemoryImage,
    events: Vec<ReceiverEvent>,
}

/// Runs a migration of two passes and a blob from a generated guest through `connector` to
/// `acceptor`, destination on its own thread.
fn migrate(
    connector: Box<dyn Connector>,
    acceptor: Box<dyn Acceptor + Send>,
    sender_config: SenderConfig,
    receiver_config: ReceiverConfig,
    sink_wrapper: Option<FailurePlan>,
) -> Outcome {
    let layout = MemoryLayout::new(vec![1500, 548]).unwrap();
    let receiver = spawn_destination(acceptor, receiver_config, sink_wrapper);

    let mut source = guest(&layout, 42);
    let sent = (|| {
        let mut sender = Sender::connect(connector, layout.clone(), sender_config)?;
        let all: Vec<PageAddr> = source.addresses().collect();
        for &addr in &all {
            sender.send_page(addr, 0, source.page(addr).unwrap())?;
        }
        sender.end_pass(0)?;
        let changed = dirty(&mut source, 3, 0x5a);
        for &addr in &changed {
            sender.send_page(addr, 1, source.page(addr).unwrap())?;
        }
        sender.end_pass(1)?;
        sender.wait_applied(1)?;
        sender.send_blob(7, b"device state")?;
        sender.finish()
    })();
    let (received, image, events) = match receiver.join().expect("receiver thread") {
        Ok((summary, image, events)) => (Ok(summary), Some(image), events),
        Err(e) => (Err(e), None, Vec::new()),
    };
    Outcome {
        sent,
        received,
        image,
        source,
        events,
    }
}

/// What a destination thread returns: its summary, the memory it received, its events.
type Destination = Result<(ReceiveSummary, MemoryImage, Vec<ReceiverEvent>), TransportError>;

/// Runs the destination of one session on its own thread, into fresh memory.
fn spawn_destination(
    mut acceptor: Box<dyn Acceptor + Send>,
    receiver_config: ReceiverConfig,
    sink_wrapper: Option<FailurePlan>,
) -> thread::JoinHandle<Destination> {
    thread::spawn(move || {
        let pending = accept(acceptor.as_mut(), &receiver_config)?;
        let mut image = MemoryImage::zeroed(pending.layout().clone());
        let mut events = Vec::new();
        let summary = {
            let writers = image.shard_writers(pending.shard_map());
            let sinks: Vec<FailingSink<'_>> = writers
                .into_iter()
                .enumerate()
                .map(|(i, w)| FailingSink {
                    inner: w,
                    fail: sink_wrapper.map(|f| f(i)),
                })
                .collect();
            pending.run(acceptor.as_mut(), sinks, |e| events.push(e))?
        };
        Ok((summary, image, events))
    })
}

/// Which pages a channel's sink refuses.
type PageFilter = Box<dyn Fn(PageAddr) -> bool + Send>;
/// For each channel index, its sink's filter.
type FailurePlan = fn(usize) -> PageFilter;

/// A sink that can be told to fail at some page.
struct FailingSink<'a> {
    inner: pagecodec::ShardWriter<'a>,
    fail: Option<PageFilter>,
}

impl PageSink for FailingSink<'_> {
    fn zero(&mut self, addr: PageAddr, generation: u32) -> Result<(), SinkError> {
        self.check(addr)?;
        self.inner.zero(addr, generation)
    }
    fn data(&mut self, addr: PageAddr, generation: u32, page: &Page) -> Result<(), SinkError> {
        self.check(addr)?;
        self.inner.data(addr, generation, page)
    }
}

impl FailingSink<'_> {
    fn check(&self, addr: PageAddr) -> Result<(), SinkError> {
        match &self.fail {
            Some(f) if f(addr) => Err("guest memory refused the page (test)".into()),
            _ => Ok(()),
        }
    }
}

fn assert_migrated(outcome: &Outcome) {
    let sent = outcome.sent.as_ref().expect("source succeeded");
    let received = outcome.received.as_ref().expect("destination succeeded");
    let image = outcome.image.as_ref().unwrap();
    assert!(
        image == &outcome.source,
        "destination memory differs from the source"
    );
    assert_eq!(sent.stats.pages(), received.stats.pages());
    assert_eq!(sent.pages_applied, received.stats.pages());
    assert_eq!(sent.stats.wire_bytes(), received.stats.wire_bytes());
    assert_eq!(
        outcome.events,
        vec![
            ReceiverEvent::PassApplied(0),
            ReceiverEvent::PassApplied(1),
            ReceiverEvent::Blob {
                tag: 7,
                data: b"device state".to_vec()
            }
        ]
    );
}

fn quiet() -> Log {
    recording_log().0
}

fn configs(channels: u16) -> (SenderConfig, ReceiverConfig) {
    (
        SenderConfig {
            channels,
            log: quiet(),
            ..SenderConfig::default()
        },
        ReceiverConfig {
            log: quiet(),
            ..ReceiverConfig::default()
        },
    )
}

fn tcp_pair(backend: TcpBackend) -> (Box<dyn Connector>, Box<dyn Acceptor + Send>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (
        Box::new(TcpConnector::new(addr, backend, Duration::from_secs(5))),
        Box::new(TcpAcceptor::new(
            listener,
            backend,
            pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY,
            quiet(),
        )),
    )
}

#[test]
fn migrates_over_memory_channels() {
    let (c, a) = memory_network(vec![], 4);
    let (s, r) = configs(4);
    assert_migrated(&migrate(Box::new(c), Box::new(a), s, r, None));
}

#[test]
fn migrates_over_sixteen_channels() {
    let (c, a) = memory_network(vec![], 2);
    let (s, r) = configs(16);
    assert_migrated(&migrate(Box::new(c), Box::new(a), s, r, None));
}

#[test]
fn migrates_over_loopback_with_io_uring() {
    let log = quiet();
    assert_eq!(
        TcpBackend::detect(&log),
        TcpBackend::Uring,
        "io_uring must work on this machine"
    );
    let (c, a) = tcp_pair(TcpBackend::Uring);
    let (s, r) = configs(3);
    assert_migrated(&migrate(c, a, s, r, None));
}

#[test]
fn migrates_over_loopback_with_blocking_sockets() {
    let (c, a) = tcp_pair(TcpBackend::Blocking);
    let (s, r) = configs(2);
    assert_migrated(&migrate(c, a, s, r, None));
}

#[test]
fn io_uring_refused_falls_back_with_a_log_line() {
    let (log, lines) = recording_log();
    let refused = std::io::Error::from_raw_os_error(libc::EPERM);
    assert_eq!(TcpBackend::choose(Err(refused), &log), TcpBackend::Blocking);
    let lines = lines.lock().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("io_uring is not available") && l.contains("blocking sockets")),
        "{lines:?}"
    );
}

#[test]
fn tiny_and_large_frames() {
    // The largest frame size whose frames still fit the destination's limit.
    let largest = (DEFAULT_MAX_FRAME_BODY as usize - pagecodec::encoder::max_frame_body(0)) as u32;
    for frame_bytes in [512, largest] {
        for backend in [TcpBackend::Uring, TcpBackend::Blocking] {
            let (c, a) = tcp_pair(backend);
            let (mut s, r) = configs(2);
            s.frame_bytes = frame_bytes;
            let outcome = migrate(c, a, s, r, None);
            assert_migrated(&outcome);
            let frames = outcome.sent.as_ref().unwrap().stats.frames();
            if frame_bytes == 512 {
                // A frame closes once it holds 512 bytes: about one record (a compressed group of
                // up to 16 pages, or one raw page) per frame.
                assert!(frames > 300, "{frames} frames for 512-byte frames");
            } else {
                assert!(frames < 40, "{frames} frames for {largest}-byte frames");
            }
        }
    }
    // One byte more could make a frame the destination refuses: the source says so at once.
    let (c, _a) = memory_network(vec![], 2);
    let (mut s, _) = configs(2);
    s.frame_bytes = largest + 1;
    let layout = MemoryLayout::new(vec![16]).unwrap();
    let err = Sender::connect(Box::new(c), layout, s).expect_err("refused");
    let text = pagestream_transport::error::full_message(&err);
    assert!(
        text.contains("more than the 1048576 a destination accepts"),
        "{text}"
    );
}

#[test]
fn slow_receiver_slows_the_sender_without_loss() {
    let slow = FaultPlan {
        receive_delay: Some(Duration::from_millis(2)),
        ..FaultPlan::default()
    };
    let (c, a) = memory_network(vec![slow.clone(), slow], 1);
    let (mut s, r) = configs(2);
    // A small budget: the source must wait for the destination instead of buffering.
    s.inflight_bytes = 2 << 20;
    s.frame_bytes = 16 << 10;
    let started = Instant::now();
    let outcome = migrate(Box::new(c), Box::new(a), s, r, None);
    assert_migrated(&outcome);
    let frames = outcome.sent.as_ref().unwrap().stats.frames();
    // Each channel's receiver took 2 ms a frame; the source could not have outrun it.
    assert!(
        started.elapsed() >= Duration::from_millis(frames / 2 * 2),
        "finished too soon"
    );
}

fn expect_failure(outcome: &Outcome, channel: Option<u16>, sender_says: &str, receiver_says: &str) {
    let sent = outcome.sent.as_ref().expect_err("source must fail");
    let received = outcome
        .received
        .as_ref()
        .expect_err("destination must fail");
    let sent_text = pagestream_transport::error::full_message(sent);
    let received_text = pagestream_transport::error::full_message(received);
    assert!(sent_text.contains(sender_says), "source said: {sent_text}");
    assert!(
        received_text.contains(receiver_says),
        "destination said: {received_text}"
    );
    if let Some(c) = channel {
        let tag = format!("channel {c}");
        assert!(
            sent_text.contains(&tag),
            "source did not name {tag}: {sent_text}"
        );
        assert!(
            received_text.contains(&tag),
            "destination did not name {tag}: {received_text}"
        );
    }
    assert!(
        outcome.image.is_none(),
        "a failed destination must not report an image"
    );
}

#[test]
fn a_channel_killed_mid_stream_fails_both_ends() {
    let kill = FaultPlan {
        kill_at_frame: Some(3),
        ..FaultPlan::default()
    };
    let (c, a) = memory_network(vec![FaultPlan::default(), kill], 4);
    let (mut s, r) = configs(3);
    s.frame_bytes = 16 << 10;
    let outcome = migrate(Box::new(c), Box::new(a), s, r, None);
    // The source knows its channel broke; the destination sees a stream cut short. Whichever
    // account reaches an end first is the one it reports, but both name channel 1.
    expect_failure(&outcome, Some(1), "channel 1", "channel 1");
    let either =
        |text: &str| text.contains("channel killed") || text.contains("ended before its End frame");
    let sent = pagestream_transport::error::full_message(outcome.sent.as_ref().unwrap_err());
    let received =
        pagestream_transport::error::full_message(outcome.received.as_ref().unwrap_err());
    assert!(either(&sent), "{sent}");
    assert!(either(&received), "{received}");
}

#[test]
fn a_corrupt_frame_fails_both_ends() {
    let corrupt = FaultPlan {
        corrupt_frame: Some(2),
        ..FaultPlan::default()
    };
    let (c, a) = memory_network(vec![corrupt], 4);
    let (mut s, r) = configs(2);
    s.frame_bytes = 16 << 10;
    let outcome = migrate(Box::new(c), Box::new(a), s, r, None);
    expect_failure(&outcome, Some(0), "checksum mismatch", "checksum mismatch");
}

#[test]
fn a_failing_destination_memory_fails_both_ends() {
    let (c, a) = tcp_pair(TcpBackend::Uring);
    let (s, r) = configs(2);
    let outcome = migrate(
        c,
        a,
        s,
        r,
        Some(|_| Box::new(|addr: PageAddr| addr.index == 700)),
    );
    expect_failure(
        &outcome,
        None,
        "guest memory refused the page",
        "guest memory refused the page",
    );
}

#[test]
fn a_refused_session_is_explained_on_both_ends() {
    let (c, a) = tcp_pair(TcpBackend::Uring);
    let (s, mut r) = configs(4);
    r.limits = AcceptLimits {
        max_channels: 2,
        ..AcceptLimits::default()
    };
    let outcome = migrate(c, a, s, r, None);
    expect_failure(
        &outcome,
        None,
        "refused the session: 4 data channels requested",
        "4 data channels requested",
    );
}

#[test]
fn a_vanished_destination_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let mut acceptor = TcpAcceptor::new(listener, TcpBackend::Uring, 1 << 20, quiet());
        let config = ReceiverConfig {
            log: quiet(),
            ..ReceiverConfig::default()
        };
        let pending = accept(&mut acceptor, &config).unwrap();
        // The destination goes away right after the handshake.
        drop(pending);
        drop(acceptor);
    });
    let connector = TcpConnector::new(addr, TcpBackend::Uring, Duration::from_secs(5));
    let layout = MemoryLayout::new(vec![256]).unwrap();
    let result = (|| {
        let mut sender = Sender::connect(Box::new(connector), layout, configs(2).0)?;
        receiver.join().unwrap();
        for i in 0..256 {
            sender.send_page(PageAddr::new(0, i), 0, &[i as u8; PAGE_SIZE])?;
        }
        sender.finish()
    })();
    let err = result.expect_err("the source must notice");
    let text = pagestream_transport::error::full_message(&err);
    assert!(
        text.contains("channel") || text.contains("control connection"),
        "unhelpful error: {text}"
    );
}

#[test]
fn a_silent_peer_times_out() {
    // A destination that completes the handshake and then never answers again.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = thread::spawn(move || {
        let mut acceptor = TcpAcceptor::new(listener, TcpBackend::Blocking, 1 << 20, quiet());
        let config = ReceiverConfig {
            log: quiet(),
            ..ReceiverConfig::default()
        };
        let pending = accept(&mut acceptor, &config).unwrap();
        thread::sleep(Duration::from_secs(3));
        drop(pending);
    });
    let config = SenderConfig {
        channels: 1,
        timeout: Duration::from_millis(800),
        heartbeat: Duration::from_millis(100),
        log: quiet(),
        ..SenderConfig::default()
    };
    let connector = TcpConnector::new(addr, TcpBackend::Blocking, Duration::from_secs(5));
    let started = Instant::now();
    let result = (|| {
        let mut sender = Sender::connect(
            Box::new(connector),
            MemoryLayout::new(vec![8]).unwrap(),
            config,
        )?;
        sender.send_page(PageAddr::new(0, 0), 0, &[1; PAGE_SIZE])?;
        sender.end_pass(0)?;
        sender.wait_applied(0)
    })();
    let err = result.expect_err("must time out");
    let text = pagestream_transport::error::full_message(&err);
    assert!(text.contains("no answer from the peer"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    hold.join().unwrap();
}

#[test]
fn strangers_cannot_join_a_session() {
    use pagestream_transport::control::{Join, Message, PROTOCOL_VERSION, SessionId};
    use std::io::Write;
    let (c, a) = tcp_pair(TcpBackend::Uring);
    // Find the acceptor's address through a connector-independent path: bind our own pair.
    drop((c, a));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (log, lines) = recording_log();
    let acceptor = TcpAcceptor::new(listener, TcpBackend::Uring, 1 << 20, log.clone());
    let receiver_config = ReceiverConfig {
        log,
        ..ReceiverConfig::default()
    };
    // A stranger opens a data connection with a wrong session id before the real one joins.
    let stranger = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut bytes = Vec::new();
        Message::Join(Join {
            version: PROTOCOL_VERSION,
            session_id: SessionId([9; 16]),
            channel: 0,
        })
        .encode(&mut bytes);
        let _ = s.write_all(&bytes);
        thread::sleep(Duration::from_millis(300));
    });
    let connector = TcpConnector::new(addr, TcpBackend::Uring, Duration::from_secs(5));
    let (s, _) = configs(2);
    let outcome = migrate(
        Box::new(SlowConnector(connector)),
        Box::new(acceptor),
        s,
        receiver_config,
        None,
    );
    stranger.join().unwrap();
    assert_migrated(&outcome);
    let lines = lines.lock().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refused a data connection") && l.contains("belongs to session")),
        "{lines:?}"
    );
}

/// Opens data channels only after a pause, so that a stranger can come first.
struct SlowConnector(TcpConnector);

impl Connector for SlowConnector {
    fn control(
        &mut self,
        timeout: Duration,
    ) -> Result<pagestream_transport::net::ControlConn, TransportError> {
        self.0.control(timeout)
    }
    fn data(
        &mut self,
        join: pagestream_transport::control::Join,
    ) -> Result<
        (
            Box<dyn pagestream_transport::channel::FrameWriter>,
            pagestream_transport::net::Killer,
        ),
        TransportError,
    > {
        if join.channel == 0 {
            thread::sleep(Duration::from_millis(400));
        }
        self.0.data(join)
    }
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
}

#[test]
fn connections_set_up_by_the_application_carry_a_session() {
    // The application authenticates every connection itself (here: a token) before the
    // transport speaks on it, and hands the accepted ones to a StreamAcceptor.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (streams_tx, streams_rx) = crossbeam_channel::unbounded();
    let gate = thread::spawn(move || {
        let mut accepted = 0;
        while accepted < 3 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut token = [0u8; 4];
            if std::io::Read::read_exact(&mut stream, &mut token).is_ok() && &token == b"AUTH" {
                streams_tx.send(stream).unwrap();
                accepted += 1;
            }
        }
    });
    // A stranger without the token never reaches the transport.
    let mut stranger = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut stranger, b"NOPE").unwrap();
    let setup: pagestream_transport::net::StreamSetup =
        Arc::new(|stream| std::io::Write::write_all(stream, b"AUTH"));
    let connector =
        TcpConnector::new(addr, TcpBackend::Uring, Duration::from_secs(5)).with_setup(setup);
    let acceptor = pagestream_transport::net::StreamAcceptor::new(
        streams_rx,
        TcpBackend::Uring,
        pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY,
        quiet(),
    );
    let (s, r) = configs(2);
    assert_migrated(&migrate(
        Box::new(connector),
        Box::new(acceptor),
        s,
        r,
        None,
    ));
    gate.join().unwrap();
}

/// A sink that, after its first page, waits for the application until the session ends.
struct WaitingSink {
    released: Arc<(Mutex<bool>, std::sync::Condvar)>,
    pages: u64,
}

impl WaitingSink {
    fn page(&mut self) -> Result<(), SinkError> {
        self.pages += 1;
        if self.pages < 2 {
            return Ok(());
        }
        let (lock, wake) = &*self.released;
        let mut released = lock.lock().unwrap();
        while !*released {
            released = wake.wait(released).unwrap();
        }
        Err("the application stopped taking pages (test)".into())
    }
}

impl PageSink for WaitingSink {
    fn zero(&mut self, _: PageAddr, _: u32) -> Result<(), SinkError> {
        self.page()
    }
    fn data(&mut self, _: PageAddr, _: u32, _: &Page) -> Result<(), SinkError> {
        self.page()
    }
}

#[test]
fn a_sink_waiting_on_the_application_is_released_when_the_session_fails() {
    let kill = FaultPlan {
        kill_at_frame: Some(3),
        ..FaultPlan::default()
    };
    let (c, mut a) = memory_network(vec![FaultPlan::default(), kill], 4);
    let (mut s, mut r) = configs(2);
    s.frame_bytes = 16 << 10;
    let released = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    r.on_end = Some({
        let released = released.clone();
        Arc::new(move || {
            *released.0.lock().unwrap() = true;
            released.1.notify_all();
        })
    });
    let receiver = thread::spawn(move || {
        let pending = accept(&mut a, &r)?;
        let sinks: Vec<WaitingSink> = (0..2)
            .map(|_| WaitingSink {
                released: released.clone(),
                pages: 0,
            })
            .collect();
        pending.run(&mut a, sinks, |_| {})
    });
    let layout = MemoryLayout::new(vec![1500, 548]).unwrap();
    let source = guest(&layout, 7);
    let sent = (|| {
        let mut sender = Sender::connect(Box::new(c), layout.clone(), s)?;
        for addr in source.addresses() {
            sender.send_page(addr, 0, source.page(addr).unwrap())?;
        }
        sender.end_pass(0)?;
        sender.finish()
    })();
    assert!(sent.is_err(), "the source must see the failure");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !receiver.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the destination hangs on a sink waiting for the application"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let received = receiver.join().unwrap();
    assert!(received.is_err(), "the destination must fail");
}

#[test]
fn workers_read_shared_memory_mixed_with_copied_pages() {
    for (connector, acceptor) in [
        {
            let (c, a) = memory_network(vec![], 3);
            (
                Box::new(c) as Box<dyn Connector>,
                Box::new(a) as Box<dyn Acceptor + Send>,
            )
        },
        tcp_pair(TcpBackend::Uring),
    ] {
        let (sender_config, receiver_config) = configs(3);
        let layout = MemoryLayout::new(vec![1500, 548]).unwrap();
        let receiver = spawn_destination(acceptor, receiver_config, None);
        let guest_memory = Arc::new(std::sync::RwLock::new(guest(&layout, 7)));
        let source: Arc<dyn PageSource> = guest_memory.clone();
        let sent = (|| {
            let mut sender = Sender::connect(connector, layout.clone(), sender_config)?;
            let all: Vec<PageAddr> = guest_memory.read().unwrap().addresses().collect();
            sender.send_shared(&source, 0, all.iter().copied())?;
            sender.end_pass(0)?;
            // Pass 1: the guest wrote every third page; half of them go as copies, half
            // read by the workers, and some pages go both ways, copy first: the worker's
            // later read must win.
            let changed = dirty(&mut guest_memory.write().unwrap(), 3, 0x33);
            for &addr in changed.iter().filter(|a| a.index % 2 == 0) {
                let mut page = [0; PAGE_SIZE];
                assert!(guest_memory.copy_page(addr, &mut page));
                sender.send_page(addr, 1, &page)?;
            }
            let stale = [0xee; PAGE_SIZE];
            sender.send_page(changed[1], 1, &stale)?;
            sender.send_shared(
                &source,
                1,
                changed.iter().copied().filter(|a| a.index % 2 == 1),
            )?;
            sender.end_pass(1)?;
            sender.wait_applied(1)?;
            sender.finish()
        })();
        let sent = sent.expect("source succeeded");
        let (received, image, _) = receiver.join().unwrap().expect("destination succeeded");
        assert!(
            image == *guest_memory.read().unwrap(),
            "destination memory differs from the shared source"
        );
        assert_eq!(sent.stats.pages(), received.stats.pages());
        assert_eq!(sent.pages_applied, received.stats.pages());
    }
}

#[test]
fn an_address_outside_memory_is_refused_after_the_pages_before_it() {
    let (c, a) = memory_network(vec![], 2);
    let (sender_config, receiver_config) = configs(2);
    let layout = MemoryLayout::new(vec![64]).unwrap();
    let receiver = spawn_destination(Box::new(a), receiver_config, None);
    let memory = guest(&layout, 9);
    let source: Arc<dyn PageSource> = Arc::new(memory.clone());
    let mut sender = Sender::connect(Box::new(c), layout.clone(), sender_config).unwrap();
    let addrs = (0..32)
        .map(|i| PageAddr::new(0, i))
        .chain([PageAddr::new(0, 64), PageAddr::new(0, 40)]);
    let err = sender.send_shared(&source, 0, addrs).expect_err("refused");
    let text = pagestream_transport::error::full_message(&err);
    assert!(text.contains("outside guest memory"), "{text}");
    // The session goes on: the rest of memory, then the end.
    sender
        .send_shared(&source, 0, (32..64).map(|i| PageAddr::new(0, i)))
        .unwrap();
    sender.finish().expect("the session finishes");
    let (_, image, _) = receiver.join().unwrap().expect("destination succeeded");
    assert!(
        image == memory,
        "pages before the refused address were lost"
    );
}

#[test]
fn a_page_source_without_the_page_fails_both_ends() {
    let (c, a) = memory_network(vec![], 2);
    let (sender_config, receiver_config) = configs(2);
    let layout = MemoryLayout::new(vec![64]).unwrap();
    let receiver = spawn_destination(Box::new(a), receiver_config, None);
    // The memory given to the workers is smaller than the session's.
    let small = guest(&MemoryLayout::new(vec![16]).unwrap(), 3);
    let source: Arc<dyn PageSource> = Arc::new(small);
    let sent = (|| {
        let mut sender = Sender::connect(Box::new(c), layout.clone(), sender_config)?;
        sender.send_shared(&source, 0, (0..64).map(|i| PageAddr::new(0, i)))?;
        sender.finish()
    })();
    let err = sent.expect_err("the source must fail");
    let text = pagestream_transport::error::full_message(&err);
    assert!(
        text.contains("not in the memory the pages are read from"),
        "{text}"
    );
    assert!(text.contains("channel"), "the channel is not named: {text}");
    let received = receiver.join().unwrap();
    let Err(err) = received else {
        panic!("the destination must fail");
    };
    let text = pagestream_transport::error::full_message(&err);
    assert!(
        text.contains("not in the memory the pages are read from"),
        "{text}"
    );
}

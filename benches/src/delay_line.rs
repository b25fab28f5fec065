//! A round-trip time for the emulated link: a delay line between two TUN devices.
//!
//! The development machines' kernel has TBF but no netem, so nothing in the kernel can hold a
//! packet back for a while. With a round-trip time asked for, [`crate::netns::LinkPair`] joins
//! its namespaces with a TUN device in each instead of a veth pair, and the delay line carries
//! every packet the kernel hands one device to the other after a fixed one-way delay, in both
//! directions. TCP then sees a real path: its congestion window, its acknowledgements and every
//! socket buffer must cover the bandwidth-delay product, as between two sites.
//!
//! The line is the link's bottleneck too ([`Bottleneck`]): packets leave it at the link's rate,
//! one after the other, from a queue of bounded length that drops what does not fit, as a
//! switch port does. The queue is in the network, not on the sending host's device, whose
//! drops TCP learns of at once and answers with a stall (see [`crate::netns`]).
//!
//! The devices keep the usual 1500-byte MTU, so TCP's segments, and with them its initial
//! window and slow start, are those of a real path; but they take segmentation offload, as a
//! veth pair or a virtio NIC does: the kernel hands the delay line segments merged into packets
//! of up to 64 KiB, each behind a `virtio_net_hdr` that says how to cut it, and the delay line
//! writes header and packet to the other device as they came. So it handles a few thousand
//! packets per second at 1 Gbit/s rather than a hundred thousand: on two CPUs it must not take
//! CPU from what it measures. Its threads' CPU time is known ([`DelayLine::cpu_s`]), so a
//! benchmark can leave it out of its own.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::machine::{clock_ticks_per_s, task_cpu_ticks};

/// The largest packet the delay line reads: a 64 KiB segmentation-offload packet and its
/// `virtio_net_hdr`, with room to spare.
const MAX_PACKET: usize = 128 << 10;
/// How often a blocked thread looks whether the line is being taken down.
const POLL: Duration = Duration::from_millis(50);
/// The `virtio_net_hdr` in front of every packet (`IFF_VNET_HDR`, the kernel's default size).
const VNET_HDR_LEN: usize = 10;

/// The link's rate and its queue: a packet that arrives while more than `queue` of transmission
/// waits ahead of it is dropped (drop-tail).
#[derive(Debug, Clone, Copy)]
pub struct Bottleneck {
    /// The link's rate.
    pub bits_per_sec: u64,
    /// The longest wait in the queue.
    pub queue: Duration,
}

impl Bottleneck {
    /// How long `packet` (as the device handed it over, `virtio_net_hdr` first) occupies the
    /// link: every segment it stands for, each with its own headers, as TBF counts them.
    fn transmission(&self, packet: &[u8]) -> Duration {
        let ip_len = packet.len().saturating_sub(VNET_HDR_LEN) as u64;
        let mut wire = ip_len;
        if let [_flags, gso_type, h0, h1, s0, s1, ..] = *packet
            && gso_type != 0
        {
            let (header, segment) = (
                u64::from(u16::from_le_bytes([h0, h1])),
                u64::from(u16::from_le_bytes([s0, s1])),
            );
            if segment > 0 && ip_len > header {
                let segments = (ip_len - header).div_ceil(segment);
                wire += (segments - 1) * header;
            }
        }
        Duration::from_secs_f64(wire as f64 * 8.0 / self.bits_per_sec as f64)
    }
}

/// Opens TUN device `name` in namespace `ns` (created there, and gone once the descriptor
/// closes). A thread of its own enters the namespace, so the caller's stays as it was.
fn open_tun(ns: &str, name: &str) -> io::Result<File> {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || -> io::Result<File> {
        crate::netns::enter(&ns)?;
        let tun = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut request = [0u8; 40]; // struct ifreq: the name, then the flags
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::other(format!(
                "interface name {name:?} is too long"
            )));
        }
        request[..bytes.len()].copy_from_slice(bytes);
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        request[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: `tun` is an open descriptor and `request` a struct ifreq-sized buffer that
        // outlives the call, as TUNSETIFF expects.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, request.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Checksums and TCP segmentation left to the far end, as a NIC with offloads takes them.
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags by value, on the open descriptor `tun`.
        let rc = unsafe {
            libc::ioctl(
                tun.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offloads as libc::c_ulong,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(tun)
    })
    .join()
    .map_err(|_| io::Error::other("the thread opening a TUN device panicked"))?
}

/// Waits until `file` has something to read, the line is taken down, or [`POLL`] passes.
fn readable(file: &File) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let rc = unsafe { libc::poll(&mut fd, 1, POLL.as_millis() as libc::c_int) };
    match rc {
        0 => Ok(false),
        1.. => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// The calling thread's id, whose CPU time `/proc/self/task/<id>/stat` gives.
fn thread_id() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// A running delay line; dropping it stops it (and with its descriptors, both devices go).
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tids: Arc<Mutex<Vec<libc::pid_t>>>,
    /// Bytes carried from `a` to `b` (see [`DelayLine::carried_bytes`]).
    carried: Arc<AtomicU64>,
}

impl std::fmt::Debug for DelayLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayLine").finish_non_exhaustive()
    }
}

impl DelayLine {
    /// Creates TUN device `a_if` in namespace `a_ns` and `b_if` in `b_ns`. They exist once this
    /// returns; [`DelayLine::start`] then carries packets between them, `one_way` late.
    pub fn open(a_ns: &str, a_if: &str, b_ns: &str, b_if: &str) -> io::Result<(File, File)> {
        Ok((open_tun(a_ns, a_if)?, open_tun(b_ns, b_if)?))
    }

    /// Carries every packet of `a` to `b` and of `b` to `a` through `bottleneck`, `one_way`
    /// after it left it.
    pub fn start(
        a: File,
        b: File,
        one_way: Duration,
        bottleneck: Bottleneck,
    ) -> io::Result<DelayLine> {
        // Built first, so that a thread that cannot start stops those that did (on drop).
        let mut line = DelayLine {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            tids: Arc::new(Mutex::new(Vec::new())),
            carried: Arc::new(AtomicU64::new(0)),
        };
        let no_count = Arc::new(AtomicU64::new(0));
        for (from, to, carried) in [
            (a.try_clone()?, b.try_clone()?, line.carried.clone()),
            (b, a, no_count),
        ] {
            let (tx, rx) = channel();
            let stop = line.stop.clone();
            let path = Path {
                one_way,
                bottleneck,
                carried,
            };
            line.spawn("ps-delay-in", move || take_in(from, &tx, &path, &stop))?;
            let stop = line.stop.clone();
            line.spawn("ps-delay-out", move || give_out(to, &rx, &stop))?;
        }
        Ok(line)
    }

    /// Starts one of the line's threads, which records its id for [`DelayLine::cpu_s`] first.
    fn spawn(&mut self, name: &str, work: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let tids = self.tids.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                tids.lock().expect("not poisoned").push(thread_id());
                work();
            })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Bytes of the packets from `a` that left the bottleneck towards `b` so far (IP packets,
    /// headers included, as a device's counter has them; not those the queue dropped).
    pub fn carried_bytes(&self) -> u64 {
        self.carried.load(Ordering::Relaxed)
    }

    /// CPU seconds the delay line's threads have used so far.
    pub fn cpu_s(&self) -> f64 {
        let ticks: u64 = self
            .tids
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(|&tid| task_cpu_ticks(&format!("/proc/self/task/{tid}/stat")).ok())
            .sum();
        ticks as f64 / clock_ticks_per_s()
    }
}

/// One direction of the line.
struct Path {
    one_way: Duration,
    bottleneck: Bottleneck,
    /// Bytes of the packets that left the bottleneck (IP packets, as a device counts them).
    carried: Arc<AtomicU64>,
}

/// Reads packets from `from`, puts each through the bottleneck (or drops it there), and queues
/// it with the moment it is due at the other end.
fn take_in(mut from: File, due: &Sender<(Instant, Vec<u8>)>, path: &Path, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_PACKET];
    // When the link has sent everything queued so far.
    let mut free_at = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match readable(&from) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let now = Instant::now();
                let start = free_at.max(now);
                if start - now > path.bottleneck.queue {
                    continue; // the queue is full: dropped
                }
                free_at = start + path.bottleneck.transmission(&buf[..n]);
                path.carried
                    .fetch_add(n.saturating_sub(VNET_HDR_LEN) as u64, Ordering::Relaxed);
                if due
                    .send((free_at + path.one_way, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes each queued packet to `to` once it is due. Packets leave the bottleneck in the order
/// they came, and the delay is the same for every packet, so they are due in that order.
fn give_out(mut to: File, due: &Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool) {
    let mut waiting: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let until_due = waiting
            .front()
            .map(|(when, _)| when.saturating_duration_since(now));
        if until_due.is_none_or(|wait| !wait.is_zero()) {
            // Take in what arrives meanwhile, without sleeping past the first one's moment.
            match due.recv_timeout(until_due.map_or(POLL, |wait| wait.min(POLL))) {
                Ok(packet) => waiting.push_back(packet),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            continue;
        }
        let (_, packet) = waiting.pop_front().expect("a packet is waiting");
        // A packet the device refuses (it went down) is lost, as on a wire.
        if let Err(e) = to.write(&packet)
            && e.kind() != io::ErrorKind::Interrupted
            && e.raw_os_error() != Some(libc::EIO)
        {
            return;
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

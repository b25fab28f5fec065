//! Two "hosts" on one machine: network namespaces joined through a switch, a third namespace
//! holding a bridge whose two ports shape each direction with TBF; or, with a round-trip time,
//! by two TUN devices and a delay line between them ([`crate::delay_line`]), which is the
//! bottleneck as well. Either way each direction queues at most 10 ms of transmission.
//!
//! Both keep the link's queue where a real path has it, in the network. A shaper on the
//! sending host's own device drops the sender's packets locally when its queue is full, and
//! TCP then holds back a connection that has nothing in flight until its zero-window probe
//! timer fires (200 ms or more): a sender with several connections, each idle now and then
//! (the shim's page channels, QEMU's multifd), lost 10-20% of a 100 Mbit/s link to such stalls,
//! one with a single busy connection none.
//!
//! Needs root. Everything created is named after this process (`psb-<pid>-…`), removed when the
//! [`LinkPair`] is dropped (also on panic), and leftovers of processes that no longer exist are
//! removed before a new pair is made. Traffic only ever flows between the two namespaces.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::delay_line::{Bottleneck, DelayLine};
use crate::transport_bench::Link;

/// How long a packet may wait in the link's queue before the queue counts as full and drops
/// (TBF's `latency`, the delay line's [`Bottleneck::queue`]): a switch port's buffer.
const QUEUE: Duration = Duration::from_millis(10);

/// A shaped link between a source and a destination namespace.
#[derive(Debug)]
pub struct LinkPair {
    src_ns: String,
    dst_ns: String,
    /// The link's ends, in their namespaces (veth ends, or TUN devices behind a delay line).
    src_if: String,
    dst_if: String,
    /// The switch between the veth ends, when the link has no round-trip time.
    switch: Option<Switch>,
    /// The delay line between the TUN devices, when the link has a round-trip time.
    delay: Option<DelayLine>,
    /// Address of the source end.
    pub src_addr: Ipv4Addr,
    /// Address of the destination end.
    pub dst_addr: Ipv4Addr,
}

/// The namespace between the two hosts: a bridge with one port towards each.
#[derive(Debug)]
struct Switch {
    ns: String,
    /// The port towards the source: its TBF shapes the way back.
    to_src: String,
    /// The port towards the destination: its TBF shapes the way there.
    to_dst: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Removes namespaces left by benchmark processes that have exited.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("psb-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

/// Whether this process may create namespaces (it runs as root).
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl LinkPair {
    /// Creates the pair with `bits_per_sec` in each direction, through a switch, TBF letting
    /// `burst_bytes` through at once.
    pub fn create(bits_per_sec: u64, burst_bytes: u64) -> Result<Self, String> {
        Self::create_with_rtt(bits_per_sec, burst_bytes, Duration::ZERO)
    }

    /// Creates the pair with `bits_per_sec` in each direction and a round-trip time of `rtt`
    /// (half of it each way; zero: through a switch, as [`LinkPair::create`]).
    pub fn create_with_rtt(
        bits_per_sec: u64,
        burst_bytes: u64,
        rtt: Duration,
    ) -> Result<Self, String> {
        if !have_root() {
            return Err(
                "emulating a link needs root (it creates network namespaces); run as root, or use --link unlimited"
                    .into(),
            );
        }
        if bits_per_sec == 0 {
            return Err("a link of 0 bits per second carries nothing".into());
        }
        remove_stale();
        let pid = std::process::id();
        let subnet = (pid % 250) as u8 + 1;
        // Several pairs of one process (tests run in parallel) need names of their own.
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let mut pair = LinkPair {
            src_ns: format!("psb-{pid}-{n}-src"),
            dst_ns: format!("psb-{pid}-{n}-dst"),
            src_if: format!("psb{pid}-{n}s"),
            dst_if: format!("psb{pid}-{n}d"),
            src_addr: Ipv4Addr::new(10, 251, subnet, 1),
            dst_addr: Ipv4Addr::new(10, 251, subnet, 2),
            switch: None,
            delay: None,
        };
        // From here on, Drop removes whatever was created, even if a step below fails.
        let (s, d) = (&pair.src_ns, &pair.dst_ns);
        let (src_if, dst_if) = (&pair.src_if, &pair.dst_if);
        let (src_addr, dst_addr) = (pair.src_addr, pair.dst_addr);
        let tbf = format!(
            "root tbf rate {bits_per_sec}bit burst {burst_bytes}b latency {}ms",
            QUEUE.as_millis()
        );
        // Every argument is free of whitespace (names generated above, a checked rate), so each
        // step can be written as one line.
        let run_all = |steps: &[String]| -> Result<(), String> {
            for step in steps {
                let args: Vec<&str> = step.split_whitespace().collect();
                run(&args)?;
            }
            Ok(())
        };
        run_all(&[format!("ip netns add {s}"), format!("ip netns add {d}")])?;
        let tuns = if rtt.is_zero() {
            let switch = pair.switch.insert(Switch {
                ns: format!("psb-{pid}-{n}-switch"),
                to_src: format!("psb{pid}-{n}ps"),
                to_dst: format!("psb{pid}-{n}pd"),
            });
            let (w, to_src, to_dst) = (&switch.ns, &switch.to_src, &switch.to_dst);
            let bridge = format!("psb{pid}-{n}b");
            run_all(&[format!("ip netns add {w}")])?;
            run_all(&[
                format!("ip link add {src_if} netns {s} type veth peer name {to_src} netns {w}"),
                format!("ip link add {dst_if} netns {d} type veth peer name {to_dst} netns {w}"),
                format!("ip -n {w} link add {bridge} type bridge"),
                format!("ip -n {w} link set {to_src} master {bridge}"),
                format!("ip -n {w} link set {to_dst} master {bridge}"),
                format!("ip -n {w} link set {bridge} up"),
                format!("ip -n {w} link set {to_src} up"),
                format!("ip -n {w} link set {to_dst} up"),
                format!("ip netns exec {w} tc qdisc add dev {to_dst} {tbf}"),
                format!("ip netns exec {w} tc qdisc add dev {to_src} {tbf}"),
                format!("ip -n {s} addr add {src_addr}/24 dev {src_if}"),
                format!("ip -n {d} addr add {dst_addr}/24 dev {dst_if}"),
            ])?;
            None
        } else {
            let tuns = DelayLine::open(s, src_if, d, dst_if)
                .map_err(|e| format!("cannot create the delay line's TUN devices: {e}"))?;
            run_all(&[
                format!("ip -n {s} addr add {src_addr} peer {dst_addr} dev {src_if}"),
                format!("ip -n {d} addr add {dst_addr} peer {src_addr} dev {dst_if}"),
            ])?;
            Some(tuns)
        };
        run_all(&[
            format!("ip -n {s} link set {src_if} up"),
            format!("ip -n {d} link set {dst_if} up"),
            format!("ip -n {s} link set lo up"),
            format!("ip -n {d} link set lo up"),
        ])?;
        if let Some((a, b)) = tuns {
            // TBF's queue holds its latency's worth at the rate, plus the burst.
            let burst = Duration::from_secs_f64(burst_bytes as f64 * 8.0 / bits_per_sec as f64);
            let bottleneck = Bottleneck {
                bits_per_sec,
                queue: QUEUE + burst,
            };
            pair.delay = Some(
                DelayLine::start(a, b, rtt / 2, bottleneck)
                    .map_err(|e| format!("cannot start the delay line: {e}"))?,
            );
        }
        Ok(pair)
    }

    /// The devices every packet crosses, as (namespace, device): the way there first, then the
    /// way back. Through a switch, its ports (which shape the link); with a delay line, the
    /// TUN devices in front of it.
    fn egress(&self) -> [(&str, &str); 2] {
        match &self.switch {
            Some(w) => [(&w.ns, &w.to_dst), (&w.ns, &w.to_src)],
            None => [(&self.src_ns, &self.src_if), (&self.dst_ns, &self.dst_if)],
        }
    }

    /// Drops every packet both ways from now on, and tells neither end (no reset, no
    /// unreachable): a network partition, as a pulled cable or a dropping firewall makes one.
    /// Each device every packet crosses (the switch's ports, or the TUN devices in front of the
    /// delay line) gets a token bucket smaller than any packet, which TBF drops.
    pub fn partition(&self) -> Result<(), String> {
        for (ns, iface) in self.egress() {
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", iface, "root", "tbf",
                "rate", "1gbit", "burst", "1", "latency", "1ms",
            ])?;
        }
        Ok(())
    }

    /// Name of the source namespace.
    pub fn src_ns(&self) -> &str {
        &self.src_ns
    }

    /// Name of the destination namespace.
    pub fn dst_ns(&self) -> &str {
        &self.dst_ns
    }

    /// Bytes that have crossed the link towards the destination so far, headers included: what
    /// left its shaper (not what the source offered it, which counts packets the link dropped).
    pub fn src_tx_bytes(&self) -> Result<u64, String> {
        if let Some(delay) = &self.delay {
            return Ok(delay.carried_bytes());
        }
        let [(ns, iface), _] = self.egress();
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat"])
            .arg(format!("/sys/class/net/{iface}/statistics/tx_bytes"))
            .output()
            .map_err(|e| format!("cannot read link counters: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "cannot read link counters".to_string())
    }

    /// CPU seconds the delay line has used so far (zero without one): the link's emulation,
    /// which is no part of what runs over it.
    pub fn emulation_cpu_s(&self) -> f64 {
        self.delay.as_ref().map_or(0.0, DelayLine::cpu_s)
    }

    /// Moves the calling thread into the source namespace (threads it starts inherit it).
    pub fn enter_src(&self) -> io::Result<()> {
        enter(&self.src_ns)
    }

    /// Moves the calling thread into the destination namespace.
    pub fn enter_dst(&self) -> io::Result<()> {
        enter(&self.dst_ns)
    }
}

/// Where a benchmark's two ends live: both in this network namespace on loopback, or on the
/// two hosts of a [`LinkPair`] shaped to the link's rate.
pub(crate) struct Hosts {
    pair: Option<LinkPair>,
}

impl Hosts {
    /// The hosts for `link`: a new [`LinkPair`] for a shaped link (removed when dropped).
    pub(crate) fn new(link: &Link) -> Result<Self, String> {
        let pair = match link {
            Link::Loopback => None,
            Link::Shaped { bits_per_sec, .. } => {
                // A burst of about one timer tick at the rate, at least 64 KiB.
                let burst = (bits_per_sec / 8 / 250).max(64 << 10);
                Some(LinkPair::create(*bits_per_sec, burst)?)
            }
        };
        Ok(Self { pair })
    }

    /// The destination's address.
    pub(crate) fn dst_addr(&self) -> IpAddr {
        self.pair
            .as_ref()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |p| IpAddr::V4(p.dst_addr))
    }

    /// Moves the calling thread onto the source host.
    pub(crate) fn enter_src(&self) -> Result<(), String> {
        match &self.pair {
            Some(p) => p
                .enter_src()
                .map_err(|e| format!("cannot enter the source namespace: {e}")),
            None => Ok(()),
        }
    }

    /// Moves the calling thread onto the destination host.
    pub(crate) fn enter_dst(&self) -> Result<(), String> {
        match &self.pair {
            Some(p) => p
                .enter_dst()
                .map_err(|e| format!("cannot enter the destination namespace: {e}")),
            None => Ok(()),
        }
    }

    /// A TCP listener on the destination host, on a free port (opened from a thread of its
    /// own, so that the caller stays where it is).
    pub(crate) fn listen_dst(&self) -> Result<TcpListener, String> {
        let addr = SocketAddr::new(self.dst_addr(), 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_dst()?;
                TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
            })
            .join()
            .map_err(|_| "the listening thread panicked".to_string())?
        })
    }
}

pub(crate) fn enter(ns: &str) -> io::Result<()> {
    let file = File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: `file` is an open namespace file for the duration of the call; setns only changes
    // the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for LinkPair {
    fn drop(&mut self) {
        // The TUN devices go with the delay line's descriptors.
        drop(self.delay.take());
        // Deleting a namespace removes the veth ends in it, and with them the pairs.
        let _ = run(&["ip", "netns", "del", &self.src_ns]);
        let _ = run(&["ip", "netns", "del", &self.dst_ns]);
        if let Some(w) = &self.switch {
            let _ = run(&["ip", "netns", "del", &w.ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    fn namespaces() -> String {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Reads `/sys/class/net/{iface}/statistics/{counter}` in namespace `ns`.
    fn counter(ns: &str, iface: &str, counter: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat"])
            .arg(format!("/sys/class/net/{iface}/statistics/{counter}"))
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{iface} in {ns} has a {counter} counter"))
    }

    /// The queueing disciplines of device `iface` in namespace `ns`, as `tc` shows them.
    fn qdiscs(ns: &str, iface: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "tc", "qdisc", "show", "dev", iface])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A listener on the destination end of `pair`, on a free port.
    fn listen_at_destination(pair: &LinkPair) -> TcpListener {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    pair.enter_dst().expect("enter the destination namespace");
                    TcpListener::bind((pair.dst_addr, 0)).expect("listen on the destination end")
                })
                .join()
                .expect("listener thread")
        })
    }

    /// Sends 4 MiB from the source to the destination over one connection, and checks that
    /// they all arrive, no sooner than a link of `bits_per_sec` can carry them (less what its
    /// queue and burst hold), and that the link counted them.
    fn send_through(pair: &LinkPair, bits_per_sec: u64) {
        const BYTES: usize = 4 << 20;
        let dst_addr = pair.dst_addr;
        let listener = listen_at_destination(pair);
        let port = listener.local_addr().expect("address").port();
        let sink = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            conn.read_to_end(&mut got).expect("read to the end");
            (got.len(), Instant::now())
        });
        let before = pair.src_tx_bytes().expect("the link's counter");
        let start = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    pair.enter_src().expect("enter the source namespace");
                    let start = Instant::now();
                    let mut conn = TcpStream::connect((dst_addr, port)).expect("connect");
                    conn.write_all(&vec![7u8; BYTES]).expect("send");
                    start
                })
                .join()
                .expect("client thread")
        });
        let (got, end) = sink.join().expect("sink thread");
        assert_eq!(got, BYTES);
        // The link may let its queue and a burst through at once: 10 ms and 64 KiB.
        let shaped = (BYTES - (64 << 10)) as f64 * 8.0 / bits_per_sec as f64 - 0.01;
        let took = (end - start).as_secs_f64();
        assert!(
            took >= shaped,
            "{BYTES} bytes crossed a {bits_per_sec} bit/s link in {took:.3} s, under {shaped:.3} s"
        );
        let crossed = pair.src_tx_bytes().expect("the link's counter") - before;
        assert!(
            crossed >= BYTES as u64,
            "the link counts what crossed it, headers included: {crossed} bytes for {BYTES}"
        );
    }

    #[test]
    fn a_link_through_the_switch_carries_a_connection_and_goes_away() {
        let pair =
            LinkPair::create(100_000_000, 64 << 10).expect("three network namespaces (needs root)");
        let switch = pair
            .switch
            .as_ref()
            .expect("a link without a round trip has a switch");
        let switch_ns = switch.ns.clone();
        send_through(&pair, 100_000_000);
        // The shapers are the switch's ports: the source's own device has none, so it never
        // drops its host's packets itself.
        let src_qdiscs = qdiscs(pair.src_ns(), &pair.src_if);
        assert!(
            !src_qdiscs.contains("tbf"),
            "the source's device is not shaped: {src_qdiscs}"
        );
        assert_eq!(counter(pair.src_ns(), &pair.src_if, "tx_dropped"), 0);
        assert!(
            qdiscs(&switch_ns, &switch.to_dst).contains("tbf"),
            "the switch's port towards the destination shapes the way there"
        );
        drop(pair);
        assert!(
            !namespaces().contains(&switch_ns),
            "the namespaces are removed with the pair"
        );
    }

    #[test]
    fn a_link_with_a_round_trip_time_delays_both_ways_shapes_and_goes_away() {
        let rtt = Duration::from_millis(60);
        let pair = LinkPair::create_with_rtt(20_000_000, 64 << 10, rtt)
            .expect("two network namespaces and a delay line (needs root)");
        let (src_ns, dst_addr) = (pair.src_ns().to_string(), pair.dst_addr);
        let listener = listen_at_destination(&pair);
        let port = listener.local_addr().expect("address").port();
        let echo = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).expect("read the byte");
            conn.write_all(&byte).expect("send it back");
        });
        let (handshake, round_trip) = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    pair.enter_src().expect("enter the source namespace");
                    let start = Instant::now();
                    let mut conn = TcpStream::connect((dst_addr, port)).expect("connect");
                    // connect returns on the SYN-ACK: one round trip.
                    let handshake = start.elapsed();
                    let start = Instant::now();
                    conn.write_all(&[7]).expect("send a byte");
                    let mut byte = [0u8; 1];
                    conn.read_exact(&mut byte).expect("read it back");
                    assert_eq!(byte, [7]);
                    (handshake, start.elapsed())
                })
                .join()
                .expect("client thread")
        });
        echo.join().expect("echo thread");
        assert!(
            handshake >= rtt,
            "the handshake took {handshake:?}, under {rtt:?}"
        );
        assert!(
            round_trip >= rtt,
            "a byte came back in {round_trip:?}, under {rtt:?}"
        );
        // The delay line is the link's bottleneck too (slow start alone would take a third of
        // the time at this round trip).
        send_through(&pair, 20_000_000);
        drop(pair);
        assert!(
            !namespaces().contains(&src_ns),
            "the namespaces are removed with the pair"
        );
    }
}

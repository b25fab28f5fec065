//! Two "hosts" on one machine: network namespaces joined by a veth pair, shaped by TBF.
//!
//! Needs root. Everything created is named after this process (`psb-<pid>-…`), removed when the
//! [`LinkPair`] is dropped (also on panic), and leftovers of processes that no longer exist are
//! removed before a new pair is made. Traffic only ever flows between the two namespaces.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A shaped link between a source and a destination namespace.
#[derive(Debug)]
pub struct LinkPair {
    src_ns: String,
    dst_ns: String,
    /// The veth ends, in their namespaces.
    src_if: String,
    dst_if: String,
    /// Address of the source end.
    pub src_addr: Ipv4Addr,
    /// Address of the destination end.
    pub dst_addr: Ipv4Addr,
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
    /// Creates the pair with `rate` (a `tc` rate such as `1gbit`) in each direction.
    pub fn create(rate: &str, burst_bytes: u64) -> Result<Self, String> {
        if !have_root() {
            return Err(
                "emulating a link needs root (it creates network namespaces); run as root, or use --link unlimited"
                    .into(),
            );
        }
        if rate.is_empty() || rate.contains(char::is_whitespace) {
            return Err(format!(
                "{rate:?} is not a link rate (write it like 1gbit or 100mbit)"
            ));
        }
        remove_stale();
        let pid = std::process::id();
        let subnet = (pid % 250) as u8 + 1;
        // Several pairs of one process (tests run in parallel) need names of their own.
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let pair = LinkPair {
            src_ns: format!("psb-{pid}-{n}-src"),
            dst_ns: format!("psb-{pid}-{n}-dst"),
            src_if: format!("psb{pid}-{n}s"),
            dst_if: format!("psb{pid}-{n}d"),
            src_addr: Ipv4Addr::new(10, 251, subnet, 1),
            dst_addr: Ipv4Addr::new(10, 251, subnet, 2),
        };
        // From here on, Drop removes whatever was created, even if a step below fails.
        let (s, d) = (&pair.src_ns, &pair.dst_ns);
        let (src_if, dst_if) = (&pair.src_if, &pair.dst_if);
        let (src_addr, dst_addr) = (pair.src_addr, pair.dst_addr);
        let tbf = format!("root tbf rate {rate} burst {burst_bytes}b latency 10ms");
        // Every argument is free of whitespace (names generated above, a checked rate), so each
        // step can be written as one line.
        let steps = [
            format!("ip netns add {s}"),
            format!("ip netns add {d}"),
            format!("ip link add {src_if} netns {s} type veth peer name {dst_if} netns {d}"),
            format!("ip -n {s} addr add {src_addr}/24 dev {src_if}"),
            format!("ip -n {d} addr add {dst_addr}/24 dev {dst_if}"),
            format!("ip -n {s} link set {src_if} up"),
            format!("ip -n {d} link set {dst_if} up"),
            format!("ip -n {s} link set lo up"),
            format!("ip -n {d} link set lo up"),
            format!("ip netns exec {s} tc qdisc add dev {src_if} {tbf}"),
            format!("ip netns exec {d} tc qdisc add dev {dst_if} {tbf}"),
        ];
        for step in &steps {
            let args: Vec<&str> = step.split_whitespace().collect();
            run(&args)?;
        }
        Ok(pair)
    }

    /// Drops every packet both ways from now on, and tells neither end (no reset, no
    /// unreachable): a network partition, as a pulled cable or a dropping firewall makes one.
    /// Each end's shaper becomes a token bucket smaller than any packet, which TBF drops.
    pub fn partition(&self) -> Result<(), String> {
        for (ns, iface) in [(&self.src_ns, &self.src_if), (&self.dst_ns, &self.dst_if)] {
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

    /// Bytes the source end has transmitted so far (everything that crossed the link towards the
    /// destination, headers included).
    pub fn src_tx_bytes(&self) -> Result<u64, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.src_ns, "cat"])
            .arg(format!(
                "/sys/class/net/{}/statistics/tx_bytes",
                self.src_if
            ))
            .output()
            .map_err(|e| format!("cannot read link counters: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "cannot read link counters".to_string())
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

fn enter(ns: &str) -> io::Result<()> {
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
        // Deleting a namespace removes the veth end in it, and with it the pair.
        let _ = run(&["ip", "netns", "del", &self.src_ns]);
        let _ = run(&["ip", "netns", "del", &self.dst_ns]);
    }
}

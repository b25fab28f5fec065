//! `pagestream bench transport`: a memory image from a sender to a receiver through the
//! transport, against the same bytes sent raw over one plain TCP socket, on the same link, in
//! the same run.
//!
//! The link is loopback, or two network namespaces joined through a switch (a third namespace,
//! [`crate::netns`]) whose ports are shaped by TBF at the requested rate. Sender and receiver are threads of this process, each
//! moved into its namespace. Times run from the first connection attempt to the moment the
//! receiving end confirms it has everything (the transport's `Complete`, the baseline's
//! acknowledgement), so setup and tail are included.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagecodec::{MemoryImage, MemoryLayout, PAGE_SIZE, PageAddr, PageClass};
use pagestream_transport::net::Log;
use pagestream_transport::{
    PageSource, ReceiverConfig, Sender, SenderConfig, TcpAcceptor, TcpBackend, TcpConnector, accept,
};
use serde::Serialize;

use crate::netns::Hosts;

/// The link to measure over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Loopback, no shaping.
    Loopback,
    /// A link through a switch shaped to `bits_per_sec` (the `tc` rate text kept for the command).
    Shaped {
        /// Rate as given to `tc`.
        tc_rate: String,
        /// Rate in bits per second.
        bits_per_sec: u64,
    },
}

/// Parses `unlimited`, or a rate such as `1gbit`, `10gbit`, `500mbit`, `2.5gbit`.
pub fn parse_link(text: &str) -> Result<Link, String> {
    let t = text.trim().to_ascii_lowercase();
    if t == "unlimited" || t == "loopback" {
        return Ok(Link::Loopback);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("link rate '{text}' needs a unit: kbit, mbit or gbit"))?;
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("'{text}' is not a link rate (examples: 1gbit, 500mbit, unlimited)")
    })?;
    let scale = match unit {
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => {
            return Err(format!(
                "unknown unit in link rate '{text}' (use kbit, mbit or gbit)"
            ));
        }
    };
    let bits = value * scale;
    if !(1e5..=1e11).contains(&bits) {
        return Err(format!(
            "link rate '{text}' is out of range (100kbit to 100gbit)"
        ));
    }
    let bits_per_sec = bits as u64;
    Ok(Link::Shaped {
        tc_rate: format!("{bits_per_sec}bit"),
        bits_per_sec,
    })
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct TransportBenchConfig {
    /// Data channels.
    pub channels: u16,
    /// The link.
    pub link: Link,
    /// Runs of each side; figures are medians.
    pub repeat: u32,
    /// How much to compress.
    pub compression: pagestream_transport::Compression,
    /// Memory the source may hold in flight.
    pub inflight_bytes: usize,
    /// Force blocking sockets instead of io_uring.
    pub blocking: bool,
}

/// One class's share.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClassShare {
    /// Pages.
    pub pages: u64,
    /// Record bytes.
    pub wire_bytes: u64,
}

/// The result of `pagestream bench transport`.
#[derive(Clone, Debug, Serialize)]
pub struct TransportBenchReport {
    /// Whether every run delivered exactly the image.
    pub verified: bool,
    /// Raw bytes delivered per second by the transport, MB/s (10^6), median.
    pub effective_mb_s: f64,
    /// Frame bytes per second on the link, MB/s, median.
    pub wire_mb_s: f64,
    /// The same image as raw bytes over one TCP socket, MB/s, median.
    pub baseline_mb_s: f64,
    /// The link's rate in MB/s (bits / 8 / 10^6); null on loopback, which has none.
    pub link_mb_s: Option<f64>,
    /// effective / baseline.
    pub effective_vs_baseline: f64,
    /// wire / link rate.
    pub wire_vs_link: Option<f64>,
    /// `loopback` or the rate.
    pub link: String,
    /// Data channels.
    pub channels: u16,
    /// Memory the source could hold in flight, bytes.
    pub inflight_bytes: usize,
    /// Data-channel backend.
    pub backend: String,
    /// Pages in the image.
    pub pages: u64,
    /// Bytes in the image.
    pub raw_bytes: u64,
    /// Bytes of frames, from the median run.
    pub wire_bytes: u64,
    /// Seconds per run, transport (median).
    pub elapsed_s: f64,
    /// Seconds per run, baseline (median).
    pub baseline_elapsed_s: f64,
    /// Seconds of every transport run, fastest first: the spread on a noisy machine.
    pub runs_s: Vec<f64>,
    /// Seconds of every baseline run, fastest first.
    pub baseline_runs_s: Vec<f64>,
    /// Pages by class, from the median run.
    pub classes: BTreeMap<&'static str, ClassShare>,
    /// Share of LZ4 groups compressed at the end, per channel, percent (median run).
    pub compression_level: Vec<u64>,
    /// Runs per side.
    pub repeat: u32,
    /// The machine.
    pub machine: String,
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn quiet() -> Log {
    Arc::new(|_| {})
}

/// Raw bytes over one socket; returns the seconds taken and whether the bytes arrived intact.
fn baseline_run(hosts: &Hosts, image: &[u8], received: &mut [u8]) -> Result<(f64, bool), String> {
    std::thread::scope(|scope| {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let receiver = std::thread::Builder::new()
            .name("ps-bench-dst".into())
            .spawn_scoped(scope, move || -> Result<bool, String> {
                hosts.enter_dst()?;
                let listener = TcpListener::bind(SocketAddr::new(hosts.dst_addr(), 0))
                    .map_err(|e| format!("baseline: cannot listen: {e}"))?;
                port_tx
                    .send(listener.local_addr().map_err(|e| e.to_string())?.port())
                    .map_err(|e| e.to_string())?;
                let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
                let mut got = 0;
                while got < received.len() {
                    let n = stream
                        .read(&mut received[got..])
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                stream.write_all(&[1]).map_err(|e| e.to_string())?;
                Ok(got == image.len() && received[..] == image[..])
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "baseline receiver did not start".to_string())?;
        let sender = std::thread::Builder::new()
            .name("ps-bench-src".into())
            .spawn_scoped(scope, move || -> Result<f64, String> {
                hosts.enter_src()?;
                let started = Instant::now();
                let mut stream = TcpStream::connect(SocketAddr::new(hosts.dst_addr(), port))
                    .map_err(|e| format!("baseline: cannot connect: {e}"))?;
                for chunk in image.chunks(1 << 20) {
                    stream.write_all(chunk).map_err(|e| e.to_string())?;
                }
                let mut ack = [0u8; 1];
                stream.read_exact(&mut ack).map_err(|e| e.to_string())?;
                Ok(started.elapsed().as_secs_f64())
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let secs = sender.join().map_err(|_| "baseline sender panicked")??;
        let ok = receiver
            .join()
            .map_err(|_| "baseline receiver panicked")??;
        Ok((secs, ok))
    })
}

struct TransportRun {
    secs: f64,
    wire_bytes: u64,
    classes: pagecodec::ClassCounts,
    compression_level: Vec<u64>,
    backend: &'static str,
}

fn transport_run(
    hosts: &Hosts,
    source: &Arc<MemoryImage>,
    dest: &mut MemoryImage,
    config: &TransportBenchConfig,
    backend: TcpBackend,
) -> Result<TransportRun, String> {
    let layout = source.layout().clone();
    std::thread::scope(|scope| {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let receiver = std::thread::Builder::new()
            .name("ps-bench-dst".into())
            .spawn_scoped(scope, move || -> Result<(), String> {
                hosts.enter_dst()?;
                let listener = TcpListener::bind(SocketAddr::new(hosts.dst_addr(), 0))
                    .map_err(|e| format!("cannot listen: {e}"))?;
                port_tx
                    .send(listener.local_addr().map_err(|e| e.to_string())?.port())
                    .map_err(|e| e.to_string())?;
                let mut acceptor = TcpAcceptor::new(
                    listener,
                    backend,
                    pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY,
                    quiet(),
                );
                let receiver_config = ReceiverConfig {
                    log: quiet(),
                    ..ReceiverConfig::default()
                };
                let pending = accept(&mut acceptor, &receiver_config).map_err(|e| e.to_string())?;
                if pending.layout() != dest.layout() {
                    return Err("the sender's memory layout differs from the receiver's".into());
                }
                let sinks = dest.shard_writers(pending.shard_map());
                pending
                    .run(&mut acceptor, sinks, |_| {})
                    .map_err(|e| pagestream_transport::error::full_message(&e))?;
                Ok(())
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "receiver did not start".to_string())?;
        let sender = std::thread::Builder::new()
            .name("ps-bench-src".into())
            .spawn_scoped(
                scope,
                move || -> Result<(f64, pagestream_transport::SendSummary), String> {
                    hosts.enter_src()?;
                    let started = Instant::now();
                    let connector = TcpConnector::new(
                        SocketAddr::new(hosts.dst_addr(), port),
                        backend,
                        Duration::from_secs(10),
                    );
                    let sender_config = SenderConfig {
                        channels: config.channels,
                        compression: config.compression,
                        inflight_bytes: config.inflight_bytes,
                        log: quiet(),
                        ..SenderConfig::default()
                    };
                    let full = |e: pagestream_transport::TransportError| {
                        pagestream_transport::error::full_message(&e)
                    };
                    let mut sender = Sender::connect(Box::new(connector), layout, sender_config)
                        .map_err(full)?;
                    // Guest memory the channel workers read themselves, as a VMM's would be.
                    let memory: Arc<dyn PageSource> = source.clone();
                    sender
                        .send_shared(&memory, 0, source.addresses())
                        .map_err(full)?;
                    let summary = sender.finish().map_err(full)?;
                    Ok((started.elapsed().as_secs_f64(), summary))
                },
            )
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let sent = sender.join().map_err(|_| "sender panicked")?;
        let received = receiver.join().map_err(|_| "receiver panicked")?;
        let (secs, summary) = sent?;
        received?;
        Ok(TransportRun {
            secs,
            wire_bytes: summary.stats.wire_bytes(),
            classes: summary.stats.classes,
            compression_level: summary
                .stats
                .channels
                .iter()
                .map(|c| c.compression_level)
                .collect(),
            backend: summary.backend,
        })
    })
}

/// Fills `image` with a pattern no page is likely to have, so that a page the transport fails
/// to deliver shows up in the comparison.
fn poison(image: &mut MemoryImage) {
    let addrs: Vec<PageAddr> = image.addresses().collect();
    for addr in addrs {
        image.page_mut(addr).expect("own address").fill(0xa5);
    }
}

/// Runs the benchmark on `image` (whole pages), calling `progress` before each step.
pub fn run(
    image: &[u8],
    config: &TransportBenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<TransportBenchReport, String> {
    if image.is_empty() || !image.len().is_multiple_of(PAGE_SIZE) {
        return Err("the image must be a non-empty whole number of pages".into());
    }
    progress("setting up the link");
    let hosts = Hosts::new(&config.link)?;
    let source = Arc::new(MemoryImage::from_bytes(image.to_vec()));
    let layout = MemoryLayout::single(image.len() as u64).map_err(|e| e.to_string())?;
    let mut dest = MemoryImage::zeroed(layout);
    poison(&mut dest);
    let mut received = vec![0xa5u8; image.len()];
    let backend = if config.blocking {
        TcpBackend::Blocking
    } else {
        TcpBackend::detect(&pagestream_transport::net::stderr_log())
    };
    let repeat = config.repeat.max(1);
    let mut baseline = Vec::new();
    let mut runs = Vec::new();
    let mut verified = true;
    for i in 1..=repeat {
        progress(&format!("run {i}/{repeat}: raw bytes over one TCP socket"));
        received.fill(0xa5);
        let (secs, ok) = baseline_run(&hosts, image, &mut received)?;
        if !ok {
            return Err("the baseline delivered different bytes".into());
        }
        baseline.push(secs);
        progress(&format!(
            "run {i}/{repeat}: pagestream, {} channels",
            config.channels
        ));
        poison(&mut dest);
        let run = transport_run(&hosts, &source, &mut dest, config, backend)?;
        verified &= dest == *source;
        runs.push(run);
    }
    baseline.sort_by(f64::total_cmp);
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let median = &runs[runs.len() / 2];
    let baseline_secs = baseline[baseline.len() / 2];
    let raw = image.len() as u64;
    let link_mb_s = match &config.link {
        Link::Loopback => None,
        Link::Shaped { bits_per_sec, .. } => Some(*bits_per_sec as f64 / 8.0 / 1e6),
    };
    let effective = mb_s(raw, median.secs);
    let wire = mb_s(median.wire_bytes, median.secs);
    let baseline_mb_s = mb_s(raw, baseline_secs);
    Ok(TransportBenchReport {
        verified,
        effective_mb_s: effective,
        wire_mb_s: wire,
        baseline_mb_s,
        link_mb_s,
        effective_vs_baseline: effective / baseline_mb_s,
        wire_vs_link: link_mb_s.map(|l| wire / l),
        link: match &config.link {
            Link::Loopback => "loopback".into(),
            Link::Shaped { tc_rate, .. } => tc_rate.clone(),
        },
        channels: config.channels,
        inflight_bytes: config.inflight_bytes,
        backend: median.backend.to_string(),
        pages: raw / PAGE_SIZE as u64,
        raw_bytes: raw,
        wire_bytes: median.wire_bytes,
        elapsed_s: median.secs,
        baseline_elapsed_s: baseline_secs,
        runs_s: runs.iter().map(|r| r.secs).collect(),
        baseline_runs_s: baseline.clone(),
        classes: PageClass::ALL
            .iter()
            .map(|&c| {
                (
                    c.name(),
                    ClassShare {
                        pages: median.classes.pages(c),
                        wire_bytes: median.classes.wire_bytes(c),
                    },
                )
            })
            .collect(),
        compression_level: median.compression_level.clone(),
        repeat,
        machine: crate::machine::describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rates() {
        assert_eq!(parse_link("unlimited"), Ok(Link::Loopback));
        assert_eq!(
            parse_link("1gbit"),
            Ok(Link::Shaped {
                tc_rate: "1000000000bit".into(),
                bits_per_sec: 1_000_000_000
            })
        );
        assert!(matches!(
            parse_link("2.5gbit"),
            Ok(Link::Shaped {
                bits_per_sec: 2_500_000_000,
                ..
            })
        ));
        assert!(parse_link("10").is_err());
        assert!(parse_link("fast").is_err());
        assert!(parse_link("1tbit").is_err());
        assert!(parse_link("10bit").is_err());
    }
}

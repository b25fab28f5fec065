//! `pagestream bench shim`: a saved QEMU migration stream replayed through the shims, without
//! VMs, to measure what the shim pipeline itself costs per byte.
//!
//! `bench qemu` measures what users see, but most of its time and CPU is QEMU's (TCG guests,
//! the destination's first touch of fresh memory), so the shims' own cost drowns in noise.
//! Here the two QEMUs are replaced by stand-ins that do only what QEMU's migration code does
//! with the stream: the source writes a recorded stream (QMP `migrate exec:cat > FILE`) from
//! memory into its socket, and the destination ("loader") reads it, parses it with the shim's
//! own stream parser and copies every page into preallocated block memory, as QEMU's
//! `ram_load` does. Both run for every method alike, so the methods differ only by the path
//! between them:
//! - `tcp`: the source writes straight to the loader over TCP, as native QEMU migrates;
//! - `shim`: through the source and destination shims in parsing mode (the destination shim
//!   rebuilds the stream on its one socket to the loader, as to a QEMU without multifd);
//! - `shim-opaque`: through the shims carrying the stream as LZ4-compressed chunks.
//!
//! Each run checks what the loader ended with: every block's memory, and the bytes the stream
//! carries besides pages (configuration, section headers, device state, vmdesc), must equal
//! what loading the recorded stream directly gives.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagestream_qemu_shim::destination::{DestinationConfig, run_destination_on};
use pagestream_qemu_shim::endpoint::Endpoint;
use pagestream_qemu_shim::session::Summary;
use pagestream_qemu_shim::source::{Mode, SourceConfig, run_source};
use pagestream_qemu_shim::stream::{Event, Parser, RamBlock, TARGET_PAGE_SIZE};
use pagestream_qemu_shim::vm::{Guest, QemuBuild, QemuVm, VmConfig};
use serde::Serialize;
use serde_json::json;

use crate::machine::{CpuTimes, CpuUse, clock_ticks_per_s};
use crate::netns::Hosts;
use crate::qemu_bench::Spread;
use crate::transport_bench::Link;

/// How the stream travels from the source stand-in to the loader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShimMethod {
    /// One TCP connection, as native QEMU migrates: the baseline.
    Tcp,
    /// The shims in parsing mode.
    Shim,
    /// The shims in opaque mode.
    ShimOpaque,
}

impl ShimMethod {
    /// Every method, in the order the bench runs them.
    pub const ALL: [ShimMethod; 3] = [ShimMethod::Tcp, ShimMethod::Shim, ShimMethod::ShimOpaque];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ShimMethod::Tcp => "tcp",
            ShimMethod::Shim => "shim",
            ShimMethod::ShimOpaque => "shim-opaque",
        }
    }
}

/// How to record a stream from a real guest.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Memory the guest's workload fills, MiB.
    pub fill_mib: u32,
    /// Pages the workload dirties per second while QEMU writes the stream.
    pub dirty_rate: u32,
    /// Which QEMU.
    pub qemu: QemuBuild,
}

/// Boots the test guest, waits until its workload has filled its memory, and saves a live
/// migration of it to `path` (QMP `migrate exec:cat > path`, the bandwidth limit lifted).
pub fn record(workspace: &Path, config: &RecordConfig, path: &Path) -> Result<(), String> {
    let target = path.display().to_string();
    // The path goes into a shell command line: refuse what would need more than single quotes.
    if target.contains('\'') || target.contains('\n') {
        return Err(format!(
            "cannot record to {target}: the path may not contain a quote or a newline"
        ));
    }
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.is_dir())
    {
        return Err(format!(
            "cannot record to {target}: {} is not a directory",
            parent.display()
        ));
    }
    let guest = Guest::locate(workspace)?;
    let dir = std::env::temp_dir().join(format!("ps-bench-shim-{}", std::process::id()));
    let err = |e: pagestream_qemu_shim::vm::VmError| format!("recording the stream: {e}");
    let result = (|| {
        let mut vm = QemuVm::start(
            &guest,
            &VmConfig {
                name: "record".into(),
                dir: dir.clone(),
                memory_mib: config.memory_mib,
                fill_mib: config.fill_mib,
                dirty_rate: config.dirty_rate,
                incoming: None,
                paused: false,
                netns: None,
                prealloc: false,
                qemu: config.qemu.clone(),
                machine: None,
                cpus: 1,
                devices: Vec::new(),
            },
        )
        .map_err(err)?;
        // Memory is full once the workload prints its first ticks.
        vm.wait_console("pagestream-workload tick", 3, Duration::from_secs(300))
            .map_err(err)?;
        vm.parameters(json!({ "max-bandwidth": 100u64 << 30 }))
            .map_err(err)?;
        vm.migrate(&format!("exec:cat > '{target}'")).map_err(err)?;
        let info = vm.wait_migration(Duration::from_secs(600)).map_err(err)?;
        if info["status"] != "completed" {
            return Err(format!(
                "recording the stream: QEMU's migration to {target} ended {} ({})",
                info["status"],
                info["error-desc"].as_str().unwrap_or("no reason given")
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What loading a stream gave: the memory of its RAM blocks and the bytes it carries besides
/// pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The RAM blocks the stream lists.
    pub blocks: Vec<RamBlock>,
    /// Each block's memory after the stream.
    pub memory: Vec<Vec<u8>>,
    /// Everything but page records, in order.
    pub other: Vec<u8>,
    /// Bytes read.
    pub stream_bytes: u64,
    /// Page records (pages with content, and filled pages).
    pub page_records: u64,
}

/// The destination stand-in: reads `input` to its end, as QEMU's loader reads a migration,
/// parsing it and copying each page into `memory` (one buffer per block, sized by
/// [`block_buffers`] from `expected` when given; cleared, and sized from the stream's own
/// block list, when not).
pub fn load(
    input: &mut dyn Read,
    expected: Option<&[RamBlock]>,
    mut memory: Vec<Vec<u8>>,
) -> Result<Loaded, String> {
    const READ: usize = 256 << 10;
    let mut parser = Parser::new();
    let mut held: Vec<u8> = Vec::with_capacity(2 * READ);
    let mut chunk = vec![0u8; READ];
    let mut other = Vec::new();
    let mut blocks: Vec<RamBlock> = Vec::new();
    let mut stream_bytes = 0u64;
    let mut page_records = 0u64;
    let mut failure: Option<String> = None;
    let mut emit = |event: Event<'_>| {
        if failure.is_some() {
            return;
        }
        match event {
            Event::Bytes(bytes) => other.extend_from_slice(bytes),
            Event::RamBlocks(listed) => {
                blocks = listed.to_vec();
                match expected {
                    Some(expected) if expected != listed => {
                        failure = Some(format!(
                            "the stream lists RAM blocks {listed:?}, not the recorded {expected:?}"
                        ));
                    }
                    Some(_) => {}
                    None => memory = block_buffers(listed),
                }
            }
            Event::Page {
                block,
                offset,
                data,
                ..
            } => {
                page_records += 1;
                match page_mut(&mut memory, block, offset) {
                    Some(page) => page.copy_from_slice(data),
                    None => failure = Some(outside(block, offset)),
                }
            }
            Event::Fill {
                block,
                offset,
                byte,
                ..
            } => {
                page_records += 1;
                match page_mut(&mut memory, block, offset) {
                    // As QEMU's ram_handle_zero: a page that already holds the byte is left
                    // untouched (not written, so not backed by the kernel if it was not).
                    Some(page) => {
                        if page.iter().any(|&b| b != byte) {
                            page.fill(byte);
                        }
                    }
                    None => failure = Some(outside(block, offset)),
                }
            }
            // As QEMU would fail loading what it does not understand, so does the loader.
            Event::PassThrough {
                reason,
                expected: false,
                at,
            } => failure = Some(format!("cannot load the stream at byte {at}: {reason}")),
            Event::RamSectionEnd | Event::PassThrough { .. } => {}
        }
    };
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "reading the stream: nothing came for {} s ({e})",
                    STALL_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("reading the stream: {e}")),
        };
        stream_bytes += n as u64;
        held.extend_from_slice(&chunk[..n]);
        parser.parse_all(&mut held, &mut emit);
    }
    parser.finish(&held, &mut emit);
    if let Some(failure) = failure {
        return Err(failure);
    }
    Ok(Loaded {
        blocks,
        memory,
        other,
        stream_bytes,
        page_records,
    })
}

fn outside(block: usize, offset: u64) -> String {
    format!("a page record at block {block}, offset {offset:#x}, lies outside the listed RAM")
}

fn page_mut(memory: &mut [Vec<u8>], block: usize, offset: u64) -> Option<&mut [u8]> {
    let start = usize::try_from(offset).ok()?;
    memory
        .get_mut(block)?
        .get_mut(start..start.checked_add(TARGET_PAGE_SIZE)?)
}

/// Zeroed memory for `blocks`, one buffer per block, whole pages.
pub fn block_buffers(blocks: &[RamBlock]) -> Vec<Vec<u8>> {
    blocks
        .iter()
        .map(|b| vec![0u8; (b.pages() as usize) * TARGET_PAGE_SIZE])
        .collect()
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct ShimBenchConfig {
    /// The link between the two hosts.
    pub link: Link,
    /// Methods, in the order each round runs them.
    pub methods: Vec<ShimMethod>,
    /// The shims' data channels.
    pub channels: u16,
    /// Rounds.
    pub repeat: u32,
    /// Print the shims' log lines to stderr.
    pub shim_log: bool,
}

/// One run of one method.
#[derive(Clone, Debug, Serialize)]
pub struct ShimRun {
    /// The method.
    pub method: ShimMethod,
    /// The round (1-based).
    pub round: u32,
    /// From the source stand-in's connect to the loader's end of stream.
    pub seconds: f64,
    /// Stream bytes per second, MB/s (10^6).
    pub stream_mb_s: f64,
    /// Bytes between the hosts: the stream's for `tcp`, the shims' link bytes otherwise.
    pub wire_bytes: u64,
    /// The machine's CPU over the run.
    pub cpu: CpuUse,
    /// Machine CPU seconds per GiB of stream.
    pub cpu_s_per_gib: f64,
    /// CPU seconds of the shims' threads (this process's, less the stand-ins').
    pub shims_cpu_s: f64,
    /// The shims' CPU seconds per GiB of stream.
    pub shims_cpu_s_per_gib: f64,
    /// CPU seconds of the two stand-ins (the source's writes, the loader's reads and copies):
    /// what the two QEMUs' migration threads would spend.
    pub stand_ins_cpu_s: f64,
    /// The mode the shims ran, and why (shim methods).
    pub mode: Option<String>,
    /// The loader ended with the recorded memory and non-page bytes.
    pub verified: bool,
    /// What went wrong, if anything.
    pub note: Option<String>,
}

/// One method's figures over its rounds.
#[derive(Clone, Debug, Serialize)]
pub struct ShimMethodSummary {
    /// The method.
    pub method: ShimMethod,
    /// Seconds.
    pub seconds: Option<Spread>,
    /// Machine CPU seconds busy.
    pub cpu_busy_s: Option<Spread>,
    /// Machine CPU seconds per GiB of stream.
    pub cpu_s_per_gib: Option<Spread>,
    /// The shims' CPU seconds per GiB of stream.
    pub shims_cpu_s_per_gib: Option<Spread>,
    /// The stand-ins' CPU seconds.
    pub stand_ins_cpu_s: Option<Spread>,
    /// Bytes between the hosts, MiB.
    pub wire_mib: Option<Spread>,
    /// Median time over `tcp`'s median time.
    pub time_vs_tcp: Option<f64>,
    /// Median machine CPU over `tcp`'s.
    pub cpu_vs_tcp: Option<f64>,
    /// Runs that verified, of all.
    pub verified: u32,
    /// Runs.
    pub runs: u32,
}

/// The result of `pagestream bench shim`.
#[derive(Clone, Debug, Serialize)]
pub struct ShimBenchReport {
    /// Stream bytes.
    pub stream_bytes: u64,
    /// Page records in the stream.
    pub page_records: u64,
    /// Guest RAM the stream carries, bytes.
    pub ram_bytes: u64,
    /// The link.
    pub link: String,
    /// The link's rate, MB/s, if shaped.
    pub link_mb_s: Option<f64>,
    /// The shims' data channels.
    pub channels: u16,
    /// Rounds.
    pub repeat: u32,
    /// Every run.
    pub runs: Vec<ShimRun>,
    /// Per method.
    pub summary: Vec<ShimMethodSummary>,
    /// Every run verified.
    pub verified: bool,
    /// The machine.
    pub machine: String,
}

/// Runs every method of `config` over `stream` (whose direct load is `reference`),
/// `config.repeat` rounds, calling `progress` before each run.
pub fn run(
    stream: Arc<Vec<u8>>,
    reference: &Loaded,
    config: &ShimBenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<ShimBenchReport, String> {
    let (link, link_mb_s) = match &config.link {
        Link::Loopback => ("loopback".to_string(), None),
        Link::Shaped {
            tc_rate,
            bits_per_sec,
        } => {
            progress("setting up the link");
            (tc_rate.clone(), Some(*bits_per_sec as f64 / 8e6))
        }
    };
    let hosts = Arc::new(Hosts::new(&config.link)?);
    let dir = std::env::temp_dir().join(format!("ps-bench-shim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The loader's memory, backed once and reused: the runs measure the path, not the kernel
    // backing fresh memory.
    let mut memory = Some(block_buffers(&reference.blocks));
    let mut runs = Vec::new();
    let result = (|| {
        for round in 1..=config.repeat {
            for &method in &config.methods {
                progress(&format!(
                    "round {round} of {}: {}",
                    config.repeat,
                    method.name()
                ));
                let mut buffers = memory.take().expect("the loader hands its memory back");
                for block in &mut buffers {
                    block.fill(0);
                }
                let (run, buffers) = run_once(
                    &hosts, &dir, &stream, reference, buffers, config, method, round,
                )?;
                memory = Some(buffers);
                runs.push(run);
            }
        }
        Ok::<(), String>(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let summary = summarize(&runs, &config.methods);
    Ok(ShimBenchReport {
        stream_bytes: reference.stream_bytes,
        page_records: reference.page_records,
        ram_bytes: reference.blocks.iter().map(|b| b.used_length).sum(),
        link,
        link_mb_s,
        channels: config.channels,
        repeat: config.repeat,
        verified: runs.iter().all(|r| r.verified),
        runs,
        summary,
        machine: crate::machine::describe(),
    })
}

type ShimThread = JoinHandle<Result<Vec<Summary>, String>>;

#[allow(clippy::too_many_arguments)]
fn run_once(
    hosts: &Arc<Hosts>,
    dir: &Path,
    stream: &Arc<Vec<u8>>,
    reference: &Loaded,
    memory: Vec<Vec<u8>>,
    config: &ShimBenchConfig,
    method: ShimMethod,
    round: u32,
) -> Result<(ShimRun, Vec<Vec<u8>>), String> {
    let dst_sock = dir.join("dst.sock");
    let src_sock = dir.join("src.sock");
    for sock in [&dst_sock, &src_sock] {
        let _ = std::fs::remove_file(sock);
    }
    // The loader, on the destination host: over TCP from the source, or on a unix socket
    // from the destination shim.
    let (listener, connect_to) = if method == ShimMethod::Tcp {
        let listener = hosts.listen_dst()?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        (LoaderListener::Tcp(listener), Target::Tcp(addr.to_string()))
    } else {
        let listener = UnixListener::bind(&dst_sock)
            .map_err(|e| format!("cannot listen on {}: {e}", dst_sock.display()))?;
        (
            LoaderListener::Unix(listener),
            Target::Unix(src_sock.clone()),
        )
    };
    let blocks = reference.blocks.clone();
    let loader = spawn("bench-loader", move || {
        let mut conn = listener.accept_within(STALL_TIMEOUT)?;
        load(&mut conn, Some(&blocks), memory).map(|l| (l, Instant::now(), thread_cpu_s()))
    });
    let shims = if method == ShimMethod::Tcp {
        Vec::new()
    } else {
        start_shims(hosts, &dst_sock, &src_sock, config, method)?
    };

    let cpu_before = CpuTimes::read()?;
    let process_before = process_cpu_s();
    let started = Instant::now();
    let writer = {
        let (hosts, stream) = (hosts.clone(), stream.clone());
        spawn("bench-source", move || -> Result<f64, String> {
            hosts.enter_src()?;
            write_stream(&connect_to, &stream)?;
            Ok(thread_cpu_s())
        })
    };
    let loaded = loader
        .join()
        .map_err(|_| "the loader panicked".to_string())?;
    let cpu = CpuTimes::read()?.since(&cpu_before, clock_ticks_per_s());
    let written = writer
        .join()
        .map_err(|_| "the source stand-in panicked".to_string())?;
    let mut notes = Vec::new();
    let source_cpu_s = written.unwrap_or_else(|e| {
        notes.push(format!("source: {e}"));
        0.0
    });
    let mut wire_bytes = stream.len() as u64;
    let mut mode = None;
    for (side, shim) in ["destination shim", "source shim"].iter().zip(shims) {
        match shim.join() {
            Ok(Ok(summaries)) => {
                for s in &summaries {
                    if let Some(e) = &s.error {
                        notes.push(format!("{side}: {e}"));
                    }
                    if *side == "source shim" {
                        wire_bytes = s.forward.wire;
                        mode = Some(s.mode.clone());
                    }
                }
            }
            Ok(Err(e)) => notes.push(format!("{side}: {e}")),
            Err(_) => notes.push(format!("{side}: panicked")),
        }
    }
    let (seconds, verified, memory, loader_cpu_s) = match loaded {
        Ok((loaded, ended, loader_cpu_s)) => {
            let seconds = ended.duration_since(started).as_secs_f64();
            let mut verified = true;
            if let Some(block) =
                (0..loaded.memory.len()).find(|&i| loaded.memory[i] != reference.memory[i])
            {
                verified = false;
                let differing = loaded.memory[block]
                    .chunks(TARGET_PAGE_SIZE)
                    .zip(reference.memory[block].chunks(TARGET_PAGE_SIZE))
                    .filter(|(a, b)| a != b)
                    .count();
                notes.push(format!(
                    "the loader's block {} differs from the recorded stream's in {differing} pages",
                    reference.blocks[block].name
                ));
            }
            if loaded.other != reference.other {
                verified = false;
                notes.push(format!(
                    "the non-page bytes the loader read ({} bytes) differ from the recorded \
                     stream's ({} bytes)",
                    loaded.other.len(),
                    reference.other.len()
                ));
            }
            (seconds, verified, loaded.memory, loader_cpu_s)
        }
        Err(e) => {
            notes.push(format!("loader: {e}"));
            (
                started.elapsed().as_secs_f64(),
                false,
                block_buffers(&reference.blocks),
                0.0,
            )
        }
    };
    // Everything in this process but the stand-ins: the shims' threads, and the kernel's work
    // on their behalf (their syscalls, and the loopback's softirqs run in their context).
    let stand_ins_cpu_s = source_cpu_s + loader_cpu_s;
    let shims_cpu_s = if method == ShimMethod::Tcp {
        0.0
    } else {
        (process_cpu_s() - process_before - stand_ins_cpu_s).max(0.0)
    };
    let gib = stream.len() as f64 / f64::from(1u32 << 30);
    Ok((
        ShimRun {
            method,
            round,
            seconds,
            stream_mb_s: stream.len() as f64 / seconds / 1e6,
            wire_bytes,
            cpu,
            cpu_s_per_gib: cpu.busy_s / gib,
            shims_cpu_s,
            shims_cpu_s_per_gib: shims_cpu_s / gib,
            stand_ins_cpu_s,
            mode,
            verified,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        },
        memory,
    ))
}

/// CPU seconds the calling thread has run.
fn thread_cpu_s() -> f64 {
    clock_s(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU seconds this process has run, its threads that ended included.
fn process_cpu_s() -> f64 {
    clock_s(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock_s(clock: libc::clockid_t) -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill; the clocks named are always there.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Starts a named thread (the name shows in profiles beside the shims' own threads).
fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("a thread starts")
}

/// How long a stand-in waits on the other end (a connection, bytes, room to write) before it
/// gives up: a shim that failed fails the run rather than hanging it.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the loader waits for its one connection.
enum LoaderListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl LoaderListener {
    /// The connection, within `timeout`, its reads giving up after `timeout` without bytes.
    fn accept_within(self, timeout: Duration) -> Result<Box<dyn Read + Send>, String> {
        let setup = |e: std::io::Error| format!("loader: {e}");
        Ok(match self {
            LoaderListener::Tcp(l) => {
                l.set_nonblocking(true).map_err(setup)?;
                let conn = accept_within(timeout, || l.accept().map(|(c, _)| c))?;
                conn.set_nonblocking(false).map_err(setup)?;
                conn.set_read_timeout(Some(timeout)).map_err(setup)?;
                Box::new(conn)
            }
            LoaderListener::Unix(l) => {
                l.set_nonblocking(true).map_err(setup)?;
                let conn = accept_within(timeout, || l.accept().map(|(c, _)| c))?;
                conn.set_nonblocking(false).map_err(setup)?;
                conn.set_read_timeout(Some(timeout)).map_err(setup)?;
                Box::new(conn)
            }
        })
    }
}

/// Calls `try_accept` (on a nonblocking listener) until it gives a connection or `timeout`
/// passes.
fn accept_within<S>(
    timeout: Duration,
    mut try_accept: impl FnMut() -> std::io::Result<S>,
) -> Result<S, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match try_accept() {
            Ok(conn) => return Ok(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "loader: nothing connected within {} s (did a shim fail?)",
                        timeout.as_secs_f64()
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("loader: accept: {e}")),
        }
    }
}

/// Where the source stand-in writes.
enum Target {
    Tcp(String),
    Unix(PathBuf),
}

/// The source stand-in: writes `stream` in 64 KiB writes, as QEMU flushes its buffer, then
/// closes.
fn write_stream(target: &Target, stream: &[u8]) -> Result<(), String> {
    const WRITE: usize = 64 << 10;
    let mut conn: Box<dyn Write> = match target {
        Target::Tcp(addr) => {
            let conn =
                TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            conn.set_write_timeout(Some(STALL_TIMEOUT))
                .map_err(|e| e.to_string())?;
            Box::new(conn)
        }
        Target::Unix(path) => {
            let conn = UnixStream::connect(path)
                .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
            conn.set_write_timeout(Some(STALL_TIMEOUT))
                .map_err(|e| e.to_string())?;
            Box::new(conn)
        }
    };
    for chunk in stream.chunks(WRITE) {
        conn.write_all(chunk)
            .map_err(|e| format!("writing the stream: {e}"))?;
    }
    Ok(())
}

/// Starts the destination shim (feeding `dst_sock`) and the source shim (listening on
/// `src_sock`), each on its host, and waits until the source shim listens.
fn start_shims(
    hosts: &Arc<Hosts>,
    dst_sock: &Path,
    src_sock: &Path,
    config: &ShimBenchConfig,
    method: ShimMethod,
) -> Result<Vec<ShimThread>, String> {
    let log: pagestream_transport::net::Log = if config.shim_log {
        pagestream_transport::net::stderr_log()
    } else {
        Arc::new(|_| {})
    };
    let listener = hosts.listen_dst()?;
    let to = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    let mut shims = Vec::new();
    {
        let (hosts, dst_sock, log) = (hosts.clone(), dst_sock.to_path_buf(), log.clone());
        shims.push(std::thread::spawn(move || {
            hosts.enter_dst()?;
            run_destination_on(
                listener,
                DestinationConfig {
                    listen: String::new(),
                    qemu: Endpoint::Unix(dst_sock),
                    key: None,
                    allow_remote_without_key: true,
                    compression: pagestream_qemu_shim::link::Compression::Auto,
                    qemu_multifd: None,
                    link_timeout: pagestream_qemu_shim::link::DEFAULT_LINK_TIMEOUT,
                    on_summary: None,
                    once: true,
                    log,
                },
            )
        }));
    }
    {
        let (hosts, src_sock, channels) = (hosts.clone(), src_sock.to_path_buf(), config.channels);
        shims.push(std::thread::spawn(move || {
            hosts.enter_src()?;
            run_source(SourceConfig {
                listen: Endpoint::Unix(src_sock),
                to,
                key: None,
                compression: pagestream_qemu_shim::link::Compression::Auto,
                mode: if method == ShimMethod::ShimOpaque {
                    Mode::Opaque
                } else {
                    Mode::Auto
                },
                channels,
                dup_cache_bytes: pagecodec::encoder::DEFAULT_DUP_CACHE_BYTES,
                delta_cache_bytes: pagecodec::encoder::DEFAULT_DELTA_CACHE_BYTES,
                link_timeout: pagestream_qemu_shim::link::DEFAULT_LINK_TIMEOUT,
                on_summary: None,
                once: true,
                log,
            })
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !src_sock.exists() {
        if Instant::now() > deadline || shims.iter().any(|s| s.is_finished()) {
            let why: Vec<String> = shims
                .into_iter()
                .filter(|s| s.is_finished())
                .filter_map(|s| match s.join() {
                    Ok(Err(e)) => Some(e),
                    _ => None,
                })
                .collect();
            return Err(format!(
                "the source shim did not listen on {} ({})",
                src_sock.display(),
                why.join("; ")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(shims)
}

/// Each method's medians and ranges, with ratios to `tcp`'s medians.
pub fn summarize(runs: &[ShimRun], methods: &[ShimMethod]) -> Vec<ShimMethodSummary> {
    let of = |method: ShimMethod, f: &dyn Fn(&ShimRun) -> f64| {
        Spread::of(
            runs.iter()
                .filter(|r| r.method == method && r.verified)
                .map(f),
        )
    };
    let tcp_time = of(ShimMethod::Tcp, &|r| r.seconds);
    let tcp_cpu = of(ShimMethod::Tcp, &|r| r.cpu.busy_s);
    let mut seen = Vec::new();
    methods
        .iter()
        .filter(|m| {
            let first = !seen.contains(*m);
            seen.push(**m);
            first
        })
        .map(|&method| {
            let seconds = of(method, &|r| r.seconds);
            let cpu_busy_s = of(method, &|r| r.cpu.busy_s);
            let ratio = |a: Option<Spread>, b: Option<Spread>| {
                a.zip(b)
                    .filter(|(_, b)| b.median > 0.0)
                    .map(|(a, b)| a.median / b.median)
            };
            ShimMethodSummary {
                method,
                seconds,
                cpu_busy_s,
                cpu_s_per_gib: of(method, &|r| r.cpu_s_per_gib),
                shims_cpu_s_per_gib: of(method, &|r| r.shims_cpu_s_per_gib),
                stand_ins_cpu_s: of(method, &|r| r.stand_ins_cpu_s),
                wire_mib: of(method, &|r| r.wire_bytes as f64 / f64::from(1u32 << 20)),
                time_vs_tcp: ratio(seconds, tcp_time),
                cpu_vs_tcp: ratio(cpu_busy_s, tcp_cpu),
                verified: runs
                    .iter()
                    .filter(|r| r.method == method && r.verified)
                    .count() as u32,
                runs: runs.iter().filter(|r| r.method == method).count() as u32,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagestream_qemu_shim::stream::{flags, write_page_record};

    const BLOCK: &str = "pc.ram";
    const BLOCK_BYTES: u64 = 4 * TARGET_PAGE_SIZE as u64;

    fn page(fill: u8) -> Vec<u8> {
        (0..TARGET_PAGE_SIZE).map(|i| fill ^ i as u8).collect()
    }

    /// A small stream in QEMU's format: one RAM block of four pages, two passes (the second
    /// rewrites page 1), a zero page, one device's state and the vmdesc trailer.
    fn stream(extra_page_at: Option<u64>) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.push(0x07); // configuration
        s.extend_from_slice(&13u32.to_be_bytes());
        s.extend_from_slice(b"pc-i440fx-7.2");
        // RAM section START: the block list.
        s.push(0x01);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.push(3);
        s.extend_from_slice(b"ram");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&4u32.to_be_bytes());
        s.extend_from_slice(&(BLOCK_BYTES | flags::MEM_SIZE).to_be_bytes());
        s.push(BLOCK.len() as u8);
        s.extend_from_slice(BLOCK.as_bytes());
        s.extend_from_slice(&BLOCK_BYTES.to_be_bytes());
        let eos_footer = |s: &mut Vec<u8>| {
            s.extend_from_slice(&flags::EOS.to_be_bytes());
            s.push(0x7e);
            s.extend_from_slice(&2u32.to_be_bytes());
        };
        eos_footer(&mut s);
        // First pass.
        s.push(0x02);
        s.extend_from_slice(&2u32.to_be_bytes());
        write_page_record(&mut s, BLOCK, 0, Some(&page(1)));
        write_page_record(&mut s, BLOCK, TARGET_PAGE_SIZE as u64, Some(&page(2)));
        write_page_record(&mut s, BLOCK, 2 * TARGET_PAGE_SIZE as u64, None);
        if let Some(offset) = extra_page_at {
            write_page_record(&mut s, BLOCK, offset, Some(&page(9)));
        }
        eos_footer(&mut s);
        // The last pass, at the section's END.
        s.push(0x03);
        s.extend_from_slice(&2u32.to_be_bytes());
        write_page_record(&mut s, BLOCK, TARGET_PAGE_SIZE as u64, Some(&page(3)));
        eos_footer(&mut s);
        // A device, the end, vmdesc.
        s.push(0x04);
        s.extend_from_slice(&7u32.to_be_bytes());
        s.push(5);
        s.extend_from_slice(b"timer");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        s.push(0x7e);
        s.extend_from_slice(&7u32.to_be_bytes());
        s.push(0x00);
        s.push(0x06);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(b"{}");
        s
    }

    #[test]
    fn loading_a_stream_gives_its_memory_and_its_other_bytes() {
        let bytes = stream(None);
        let loaded = load(&mut &bytes[..], None, Vec::new()).unwrap();
        assert_eq!(
            loaded.blocks,
            [RamBlock {
                name: BLOCK.into(),
                used_length: BLOCK_BYTES
            }]
        );
        assert_eq!(loaded.stream_bytes, bytes.len() as u64);
        assert_eq!(loaded.page_records, 4);
        let memory = &loaded.memory[0];
        assert_eq!(memory.len() as u64, BLOCK_BYTES);
        let pages: Vec<&[u8]> = memory.chunks(TARGET_PAGE_SIZE).collect();
        assert_eq!(pages[0], page(1));
        // The later pass wins.
        assert_eq!(pages[1], page(3));
        assert_eq!(pages[2], [0; TARGET_PAGE_SIZE]);
        assert_eq!(pages[3], [0; TARGET_PAGE_SIZE]);
        // The device state and the trailer are among the other bytes, in order.
        assert!(loaded.other.starts_with(b"QEVM"));
        assert!(loaded.other.ends_with(b"{}"));
        assert!(loaded.other.windows(5).any(|w| w == b"timer"));
        assert!(!loaded.other.windows(TARGET_PAGE_SIZE).any(|w| w == page(1)));

        // Loaded again into the same memory, dirtied first, as the bench reuses it: the fill
        // of page 2 must clear it, and the outcome is the same.
        let mut reused = loaded.memory.clone();
        reused[0][2 * TARGET_PAGE_SIZE] = 0xff;
        reused[0][3 * TARGET_PAGE_SIZE..].fill(0);
        let again = load(&mut &bytes[..], Some(&loaded.blocks), reused).unwrap();
        assert_eq!(again, loaded);
    }

    #[test]
    fn a_stream_that_does_not_match_the_recording_is_refused() {
        let bytes = stream(None);
        let other = [RamBlock {
            name: "pc.ram".into(),
            used_length: 2 * BLOCK_BYTES,
        }];
        let err = load(&mut &bytes[..], Some(&other), block_buffers(&other)).unwrap_err();
        assert!(err.contains("not the recorded"), "{err}");

        let outside = stream(Some(BLOCK_BYTES));
        let err = load(&mut &outside[..], None, Vec::new()).unwrap_err();
        assert!(err.contains("cannot load the stream at byte"), "{err}");
    }

    #[test]
    fn a_loader_nobody_connects_to_gives_up() {
        let dir = std::env::temp_dir().join(format!("ps-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("s")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let started = Instant::now();
        let err = accept_within(Duration::from_millis(50), || {
            listener.accept().map(|(c, _)| c)
        })
        .unwrap_err();
        assert!(err.contains("nothing connected within 0.05 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn summaries_compare_each_method_with_tcp_by_medians() {
        let run = |method, round, seconds, busy_s, verified| ShimRun {
            method,
            round,
            seconds,
            stream_mb_s: 1.0 / seconds,
            wire_bytes: 1 << 20,
            cpu: CpuUse {
                busy_s,
                idle_s: 0.0,
                steal_s: 0.0,
            },
            cpu_s_per_gib: busy_s,
            shims_cpu_s: busy_s,
            shims_cpu_s_per_gib: busy_s,
            stand_ins_cpu_s: 0.5,
            mode: None,
            verified,
            note: None,
        };
        let runs = [
            run(ShimMethod::Tcp, 1, 1.0, 1.0, true),
            run(ShimMethod::Shim, 1, 2.0, 3.0, true),
            run(ShimMethod::Tcp, 2, 3.0, 2.0, true),
            run(ShimMethod::Shim, 2, 4.0, 5.0, true),
            run(ShimMethod::Shim, 3, 0.1, 0.1, false),
        ];
        let summary = summarize(&runs, &[ShimMethod::Tcp, ShimMethod::Shim]);
        assert_eq!(summary.len(), 2);
        assert_eq!(summary[0].time_vs_tcp, Some(1.0));
        // A run that did not verify counts in neither figure.
        assert_eq!((summary[1].verified, summary[1].runs), (2, 3));
        assert_eq!(summary[1].seconds.unwrap().median, 3.0);
        assert_eq!(summary[1].time_vs_tcp, Some(1.5));
        assert_eq!(summary[1].cpu_vs_tcp, Some(4.0 / 1.5));
    }
}

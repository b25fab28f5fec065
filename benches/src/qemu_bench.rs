//! `pagestream bench qemu`: the same guest migrated over the same emulated link by QEMU alone
//! (plain `tcp:`, multifd with zstd, XBZRLE) and through the pagestream shims.
//!
//! Each method gets a fresh pair of VMs: the test guest (scripts/build-guest.sh) with its
//! workload filling memory and dirtying pages at the requested rate. QEMU's `max-bandwidth` is
//! set far above the link, so the link is the limit. Measured per method: QEMU's total time,
//! downtime from the source's `STOP` event to the destination's `RESUME` event (both carry the
//! host's time), the bytes that crossed the link (the counter of the switch port towards the
//! destination, headers included), and whether the migration converged within the time limit.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestream_qemu_shim::destination::{DestinationConfig, run_destination};
use pagestream_qemu_shim::endpoint::Endpoint;
use pagestream_qemu_shim::multifd::QemuMultifd;
use pagestream_qemu_shim::qmp::event_time;
use pagestream_qemu_shim::session::Summary;
use pagestream_qemu_shim::source::{Mode, SourceConfig, run_source};
use pagestream_qemu_shim::vm::{Guest, QemuBuild, QemuVm, VmConfig};
use serde::Serialize;
use serde_json::{Value, json};

use crate::machine::{CpuTimes, CpuUse, clock_ticks_per_s, process_cpu_s};
use crate::netns::LinkPair;
use crate::transport_bench::Link;

/// A way to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// QEMU's own `tcp:` migration.
    Native,
    /// QEMU multifd (2 channels), pages uncompressed.
    Multifd,
    /// QEMU multifd (2 channels) with zstd compression.
    MultifdZstd,
    /// QEMU with XBZRLE (64 MiB cache).
    Xbzrle,
    /// QEMU to the source shim, shim to shim over the link, to the destination QEMU: parsing
    /// mode (RAM pages through the page codec and the multi-channel transport), the destination
    /// QEMU loading the pages over 2 multifd channels (`shim recv --qemu-multifd 2`; the source
    /// QEMU plain).
    Shim,
    /// Parsing mode with a destination QEMU that loads everything from its main channel.
    ShimNoDestMultifd,
    /// The same with the shims in opaque mode (the stream carried as compressed bytes).
    ShimOpaque,
    /// QEMU multifd (2 channels, pages uncompressed) at both ends, as `virsh migrate
    /// --parallel` sets it up, through the shims: the main channel parsed, each multifd
    /// channel carried opaque on a link of its own.
    ShimMultifd,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 8] = [
        Method::Native,
        Method::Multifd,
        Method::MultifdZstd,
        Method::Xbzrle,
        Method::Shim,
        Method::ShimNoDestMultifd,
        Method::ShimOpaque,
        Method::ShimMultifd,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Native => "native",
            Method::Multifd => "multifd",
            Method::MultifdZstd => "multifd-zstd",
            Method::Xbzrle => "xbzrle",
            Method::Shim => "shim",
            Method::ShimNoDestMultifd => "shim-no-dest-multifd",
            Method::ShimOpaque => "shim-opaque",
            Method::ShimMultifd => "shim-multifd",
        }
    }

    /// Whether it goes through the shims.
    pub fn is_shim(self) -> bool {
        matches!(
            self,
            Method::Shim | Method::ShimNoDestMultifd | Method::ShimOpaque | Method::ShimMultifd
        )
    }

    fn capabilities(self) -> Vec<(&'static str, bool)> {
        match self {
            Method::Multifd | Method::MultifdZstd | Method::ShimMultifd => {
                vec![("multifd", true)]
            }
            Method::Xbzrle => vec![("xbzrle", true)],
            Method::Native | Method::Shim | Method::ShimNoDestMultifd | Method::ShimOpaque => {
                vec![]
            }
        }
    }

    fn parameters(self) -> Value {
        match self {
            Method::Multifd | Method::ShimMultifd => {
                json!({ "multifd-channels": 2, "multifd-compression": "none" })
            }
            Method::MultifdZstd => json!({ "multifd-channels": 2, "multifd-compression": "zstd" }),
            _ => json!({}),
        }
    }

    /// Multifd channels of the destination QEMU alone, fed by the destination shim.
    fn destination_multifd(self) -> Option<u8> {
        (self == Method::Shim).then_some(2)
    }
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct QemuBenchConfig {
    /// The emulated link (a rate: the methods must share a real link).
    pub link: Link,
    /// The link's round-trip time (zero: as two hosts on one switch).
    pub rtt: Duration,
    /// Guest memory.
    pub memory_mib: u32,
    /// Memory the workload fills.
    pub fill_mib: u32,
    /// Pages the workload dirties per second.
    pub dirty_rate: u32,
    /// A migration still running after this long did not converge (and is cancelled).
    pub time_limit: Duration,
    /// Methods to run.
    pub methods: Vec<Method>,
    /// Rounds: every method runs once per round, in order, so that each round compares the
    /// methods at one moment of a machine whose speed drifts.
    pub repeat: u32,
    /// Print the shims' log lines (progress and summaries, with pages by class) to stderr.
    pub shim_log: bool,
    /// Start every destination QEMU with its memory preallocated (`-mem-prealloc`), so that no
    /// method pays the first write to fresh guest memory during its migration (see
    /// `docs/benchmarks.md`: on a VM host that takes freed memory back, that first write costs
    /// more CPU than the shims' compression). Not the configuration the targets are set for.
    pub prealloc_destination: bool,
    /// Which QEMU runs both VMs of every method.
    pub qemu: QemuBuild,
}

/// One method's figures.
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    /// The method.
    pub method: Method,
    /// The round it ran in, from 1.
    pub round: u32,
    /// Whether the migration completed within the time limit.
    pub converged: bool,
    /// QEMU's final status.
    pub status: String,
    /// QEMU's `total-time`, seconds (null if it did not complete).
    pub total_s: Option<f64>,
    /// Source `STOP` to destination `RESUME`, milliseconds.
    pub downtime_ms: Option<f64>,
    /// QEMU's own `downtime` field, milliseconds (measured on the source only).
    pub qemu_downtime_ms: Option<f64>,
    /// QEMU's `setup-time`, milliseconds: from `migrate` to the first pass (dirty logging
    /// started, the RAM blocks announced); part of the total time, paid by every method alike.
    pub setup_ms: Option<f64>,
    /// Bytes that crossed the link towards the destination.
    pub wire_bytes: u64,
    /// Bytes QEMU says it transferred.
    pub qemu_transferred: u64,
    /// The whole machine's CPU time from `migrate` until the migration ended: both VMs (their
    /// guests' own work included), the shims, the kernel. On a machine whose CPUs run out, the
    /// methods that need more CPU per page take longer; this shows how much each one needed and
    /// how much was left idle.
    pub cpu: Option<CpuUse>,
    /// The same span's CPU time by process.
    pub cpu_by_process: Option<ProcessCpu>,
    /// Why a figure is missing, if one is.
    pub note: Option<String>,
}

impl MethodResult {
    /// The total time less QEMU's setup, seconds: the part of the migration its transport
    /// carries. QEMU's setup (its own work before the first page, the same for every method)
    /// took 300 to 800 ms on the same machine from one hour to the next, which moves every
    /// total by as much.
    pub fn after_setup_s(&self) -> Option<f64> {
        self.total_s.zip(self.setup_ms).map(|(t, s)| t - s / 1000.0)
    }
}

/// CPU seconds (user and system) each process used over a migration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ProcessCpu {
    /// The source QEMU (its guest's own work included).
    pub source_qemu_s: f64,
    /// The destination QEMU.
    pub destination_qemu_s: f64,
    /// Both shims (they run in the bench's own process, less the link's delay line; null for
    /// QEMU's own methods).
    pub shims_s: Option<f64>,
}

/// The result of `pagestream bench qemu`.
#[derive(Clone, Debug, Serialize)]
pub struct QemuBenchReport {
    /// The link.
    pub link: String,
    /// Its rate, MB/s.
    pub link_mb_s: Option<f64>,
    /// Its round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Filled memory, MiB.
    pub fill_mib: u32,
    /// Dirtied pages per second.
    pub dirty_rate: u32,
    /// Time limit, seconds.
    pub time_limit_s: f64,
    /// Rounds run.
    pub repeat: u32,
    /// Whether the destination QEMUs ran with their memory preallocated (`-mem-prealloc`).
    pub prealloc_destination: bool,
    /// Every run, round by round.
    pub results: Vec<MethodResult>,
    /// Per method, over its runs.
    pub summary: Vec<MethodSummary>,
    /// The shim against QEMU's own migrations.
    pub comparison: Comparison,
    /// QEMU's version.
    pub qemu: String,
    /// The machine.
    pub machine: String,
}

/// Median and range of one figure over a method's runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// The median (of an even count, the mean of the middle two).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` if there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// One method's figures over its runs. Times and downtimes are those of the runs that
/// completed; a run that did not converge has none.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MethodSummary {
    /// The method.
    pub method: Method,
    /// Runs.
    pub runs: u32,
    /// Runs that completed within the time limit.
    pub converged: u32,
    /// QEMU's total time, seconds.
    pub total_s: Option<Spread>,
    /// QEMU's setup time, milliseconds.
    pub setup_ms: Option<Spread>,
    /// The total time less QEMU's setup, seconds ([`MethodResult::after_setup_s`]).
    pub after_setup_s: Option<Spread>,
    /// Source `STOP` to destination `RESUME`, milliseconds.
    pub downtime_ms: Option<Spread>,
    /// Bytes on the link, MiB.
    pub wire_mib: Option<Spread>,
    /// The machine's busy CPU time over the migration, seconds ([`MethodResult::cpu`]).
    pub cpu_busy_s: Option<Spread>,
    /// The source QEMU's CPU time over the migration, seconds.
    pub source_qemu_cpu_s: Option<Spread>,
    /// The destination QEMU's.
    pub destination_qemu_cpu_s: Option<Spread>,
    /// The shims' (shim methods only).
    pub shims_cpu_s: Option<Spread>,
}

/// The shim (`shim`, parsing mode) against QEMU's own migrations: ratios of the medians, and
/// the same ratio within each round, where both ran at the same moment of the machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Comparison {
    /// Shim total time over native's (medians).
    pub shim_vs_native_time: Option<f64>,
    /// The same, round by round.
    pub shim_vs_native_time_by_round: Vec<f64>,
    /// Shim total time over the best QEMU configuration's (the lowest median).
    pub shim_vs_best_qemu_time: Option<f64>,
    /// Shim total time over the fastest QEMU configuration of the same round, round by round.
    pub shim_vs_best_qemu_time_by_round: Vec<f64>,
    /// Shim downtime over native's (medians).
    pub shim_vs_native_downtime: Option<f64>,
    /// Shim time after QEMU's setup over native's ([`MethodResult::after_setup_s`], medians).
    pub shim_vs_native_after_setup: Option<f64>,
    /// The same, round by round.
    pub shim_vs_native_after_setup_by_round: Vec<f64>,
}

/// Per-method summaries of `results`, in the order of `methods`.
pub fn summarize(results: &[MethodResult], methods: &[Method]) -> Vec<MethodSummary> {
    methods
        .iter()
        .map(|&method| {
            let runs: Vec<&MethodResult> = results.iter().filter(|r| r.method == method).collect();
            // CPU times, like the times, only of the runs that completed.
            let of_completed = |figure: &dyn Fn(&MethodResult) -> Option<f64>| {
                Spread::of(
                    runs.iter()
                        .filter(|r| r.converged)
                        .filter_map(|r| figure(r)),
                )
            };
            MethodSummary {
                method,
                runs: runs.len() as u32,
                converged: runs.iter().filter(|r| r.converged).count() as u32,
                total_s: Spread::of(runs.iter().filter_map(|r| r.total_s)),
                setup_ms: Spread::of(runs.iter().filter_map(|r| r.setup_ms)),
                after_setup_s: Spread::of(runs.iter().filter_map(|r| r.after_setup_s())),
                downtime_ms: Spread::of(runs.iter().filter_map(|r| r.downtime_ms)),
                wire_mib: Spread::of(
                    runs.iter()
                        .map(|r| r.wire_bytes as f64 / (1u64 << 20) as f64),
                ),
                cpu_busy_s: of_completed(&|r| r.cpu.map(|c| c.busy_s)),
                source_qemu_cpu_s: of_completed(&|r| r.cpu_by_process.map(|c| c.source_qemu_s)),
                destination_qemu_cpu_s: of_completed(&|r| {
                    r.cpu_by_process.map(|c| c.destination_qemu_s)
                }),
                shims_cpu_s: of_completed(&|r| r.cpu_by_process.and_then(|c| c.shims_s)),
            }
        })
        .collect()
}

/// The shim against QEMU's own migrations, from the runs and their summaries. A method that
/// never completed has no median and takes no part; a round counts where the shim and the
/// method compared both completed.
pub fn compare(results: &[MethodResult], summary: &[MethodSummary]) -> Comparison {
    let median = |m: Method, pick: fn(&MethodSummary) -> Option<Spread>| {
        summary
            .iter()
            .find(|s| s.method == m)
            .and_then(pick)
            .map(|s| s.median)
    };
    let shim_time = median(Method::Shim, |s| s.total_s);
    let best_qemu = summary
        .iter()
        .filter(|s| !s.method.is_shim())
        .filter_map(|s| s.total_s.map(|t| t.median))
        .min_by(f64::total_cmp);
    let rounds = results.iter().map(|r| r.round).max().unwrap_or(0);
    let mut by_native = Vec::new();
    let mut by_best = Vec::new();
    let mut after_setup_by_native = Vec::new();
    for round in 1..=rounds {
        let run = |m: Method| results.iter().find(|r| r.round == round && r.method == m);
        let after_setup = |m: Method| run(m).and_then(MethodResult::after_setup_s);
        if let Some((shim, native)) = after_setup(Method::Shim).zip(after_setup(Method::Native)) {
            after_setup_by_native.push(shim / native);
        }
        let time = |m: Method| run(m).and_then(|r| r.total_s);
        let Some(shim) = time(Method::Shim) else {
            continue;
        };
        if let Some(native) = time(Method::Native) {
            by_native.push(shim / native);
        }
        let best = results
            .iter()
            .filter(|r| r.round == round && !r.method.is_shim())
            .filter_map(|r| r.total_s)
            .min_by(f64::total_cmp);
        if let Some(best) = best {
            by_best.push(shim / best);
        }
    }
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    Comparison {
        shim_vs_native_time: ratio(shim_time, median(Method::Native, |s| s.total_s)),
        shim_vs_native_time_by_round: by_native,
        shim_vs_best_qemu_time: ratio(shim_time, best_qemu),
        shim_vs_best_qemu_time_by_round: by_best,
        shim_vs_native_downtime: ratio(
            median(Method::Shim, |s| s.downtime_ms),
            median(Method::Native, |s| s.downtime_ms),
        ),
        shim_vs_native_after_setup: ratio(
            median(Method::Shim, |s| s.after_setup_s),
            median(Method::Native, |s| s.after_setup_s),
        ),
        shim_vs_native_after_setup_by_round: after_setup_by_native,
    }
}

const PORT: u16 = 4444;

fn run_method(
    guest: &Guest,
    pair: &LinkPair,
    dir: &Path,
    config: &QemuBenchConfig,
    method: Method,
    round: u32,
) -> Result<MethodResult, String> {
    let err = |e: pagestream_qemu_shim::vm::VmError| e.to_string();
    let shim = method.is_shim();
    let dst_sock = dir.join(format!("{}-dst.sock", method.name()));
    let src_sock = dir.join(format!("{}-src.sock", method.name()));
    let vm_config = |name: &str, netns: Option<&str>| VmConfig {
        name: format!("{}-{name}", method.name()),
        dir: dir.to_path_buf(),
        memory_mib: config.memory_mib,
        fill_mib: config.fill_mib,
        dirty_rate: config.dirty_rate,
        incoming: None,
        paused: false,
        netns: netns.map(str::to_string),
        prealloc: false,
        qemu: config.qemu.clone(),
        machine: None,
        cpus: 1,
        devices: Vec::new(),
    };
    let mut dst_cfg = vm_config("dst", (!shim).then(|| pair.dst_ns()));
    dst_cfg.incoming = Some("defer".into());
    dst_cfg.prealloc = config.prealloc_destination;
    let mut dst = QemuVm::start(guest, &dst_cfg).map_err(err)?;
    // XBZRLE is a source-side capability; the destination decodes its pages regardless.
    if method != Method::Xbzrle {
        dst.capabilities(&method.capabilities()).map_err(err)?;
    }
    dst.parameters(method.parameters()).map_err(err)?;
    if let Some(channels) = method.destination_multifd() {
        dst.capabilities(&[("multifd", true)]).map_err(err)?;
        dst.parameters(json!({ "multifd-channels": channels, "multifd-compression": "none" }))
            .map_err(err)?;
    }
    let (incoming, outgoing) = if shim {
        (
            format!("unix:{}", dst_sock.display()),
            format!("unix:{}", src_sock.display()),
        )
    } else {
        let uri = format!("tcp:{}:{PORT}", pair.dst_addr);
        (uri.clone(), uri)
    };
    dst.migrate_incoming(&incoming).map_err(err)?;

    // The shims, each in its host's namespace.
    let quiet: pagestream_transport::net::Log = if config.shim_log {
        pagestream_transport::net::stderr_log()
    } else {
        Arc::new(|_| {})
    };
    let mut shims = Vec::new();
    if shim {
        let (addr, dst_ns, quiet2) = (pair.dst_addr, pair.dst_ns().to_string(), quiet.clone());
        let dst_sock = dst_sock.clone();
        let enter = |ns: &str| -> Result<(), String> {
            let f =
                std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
            use std::os::fd::AsRawFd;
            // SAFETY: `f` is an open namespace file; setns changes only this thread's namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            Ok(())
        };
        shims.push(std::thread::spawn(
            move || -> Result<Vec<Summary>, String> {
                enter(&dst_ns)?;
                run_destination(DestinationConfig {
                    listen: format!("{addr}:{PORT}"),
                    qemu: Endpoint::Unix(dst_sock),
                    key: None,
                    allow_remote_without_key: true,
                    compression: pagestream_qemu_shim::link::Compression::Auto,
                    qemu_multifd: method.destination_multifd().map(|channels| QemuMultifd {
                        channels,
                        // The bench's VMs run without -uuid: QEMU's default.
                        uuid: [0; 16],
                    }),
                    link_timeout: pagestream_qemu_shim::link::DEFAULT_LINK_TIMEOUT,
                    on_summary: None,
                    once: true,
                    log: quiet2,
                })
            },
        ));
        let (src_ns, src_sock2) = (pair.src_ns().to_string(), src_sock.clone());
        shims.push(std::thread::spawn(
            move || -> Result<Vec<Summary>, String> {
                enter(&src_ns)?;
                run_source(SourceConfig {
                    listen: Endpoint::Unix(src_sock2),
                    to: format!("{addr}:{PORT}"),
                    key: None,
                    compression: pagestream_qemu_shim::link::Compression::Auto,
                    mode: if method == Method::ShimOpaque {
                        Mode::Opaque
                    } else {
                        Mode::Auto
                    },
                    channels: pagestream_transport::default_channels(),
                    dup_cache_bytes: pagecodec::encoder::DEFAULT_DUP_CACHE_BYTES,
                    delta_cache_bytes: pagecodec::encoder::DEFAULT_DELTA_CACHE_BYTES,
                    link_timeout: pagestream_qemu_shim::link::DEFAULT_LINK_TIMEOUT,
                    on_summary: None,
                    once: true,
                    log: quiet,
                })
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !src_sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let mut src =
        QemuVm::start(guest, &vm_config("src", (!shim).then(|| pair.src_ns()))).map_err(err)?;
    // Memory is full once the workload prints its first ticks.
    src.wait_console("pagestream-workload tick", 3, Duration::from_secs(300))
        .map_err(err)?;
    src.capabilities(&method.capabilities()).map_err(err)?;
    let mut params = method.parameters();
    params["max-bandwidth"] = json!(100u64 << 30);
    src.parameters(params).map_err(err)?;

    let tx_before = pair.src_tx_bytes()?;
    let cpu_before = CpuTimes::read()?;
    // The shims run in this process.
    let me = std::process::id();
    let processes_before = (
        process_cpu_s(src.pid())?,
        process_cpu_s(dst.pid())?,
        process_cpu_s(me)? - pair.emulation_cpu_s(),
    );
    src.migrate(&outgoing).map_err(err)?;
    let started = Instant::now();
    let mut info;
    loop {
        info = src
            .qmp
            .execute("query-migrate", json!({}))
            .map_err(|e| e.to_string())?;
        let status = info["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break;
        }
        if started.elapsed() > config.time_limit {
            let _ = src.qmp.execute("migrate_cancel", json!({}));
            std::thread::sleep(Duration::from_millis(500));
            info = src
                .qmp
                .execute("query-migrate", json!({}))
                .map_err(|e| e.to_string())?;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tx_after = pair.src_tx_bytes()?;
    let cpu = CpuTimes::read()?.since(&cpu_before, clock_ticks_per_s());
    // Read while both QEMUs still run (a destination that failed may be gone: no figure).
    let cpu_by_process = process_cpu_s(src.pid())
        .and_then(|s| {
            let me = process_cpu_s(me)? - pair.emulation_cpu_s();
            Ok((s, process_cpu_s(dst.pid())?, me))
        })
        .ok()
        .map(|(source, destination, shims)| ProcessCpu {
            source_qemu_s: source - processes_before.0,
            destination_qemu_s: destination - processes_before.1,
            shims_s: shim.then_some(shims - processes_before.2),
        });
    // QEMU 7.2 reports "completed" a moment before it computes total-time (it shows 0 until
    // then): ask again until the figure is there.
    for _ in 0..50 {
        if info["status"] != "completed" || info["total-time"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        info = src
            .qmp
            .execute("query-migrate", json!({}))
            .map_err(|e| e.to_string())?;
    }
    let status = info["status"].as_str().unwrap_or("").to_string();
    let converged = status == "completed";
    let mut note = None;
    let downtime_ms = if converged {
        let stop = src.qmp.wait_event("STOP", Duration::from_secs(5));
        let resume = dst.qmp.wait_event("RESUME", Duration::from_secs(30));
        match (&stop, &resume) {
            (Ok(stop), Ok(resume)) => event_time(stop)
                .zip(event_time(resume))
                .map(|(a, b)| (b - a) * 1e3),
            _ => {
                let seen = |e: &Result<Value, pagestream_qemu_shim::qmp::QmpError>| match e {
                    Ok(_) => "seen".to_string(),
                    Err(e) => e.to_string(),
                };
                let console = dst.console_text();
                let tail: Vec<&str> = console.lines().rev().take(3).collect();
                note = Some(format!(
                    "downtime not measured: source STOP {}, destination RESUME {} (destination alive: {}; its console ends: {})",
                    seen(&stop),
                    seen(&resume),
                    dst.alive(),
                    tail.join(" | ")
                ));
                None
            }
        }
    } else {
        None
    };
    drop(src);
    drop(dst);
    // A shim that failed says why: that goes into the note.
    let mut failures = Vec::new();
    for (side, shim) in ["destination shim", "source shim"].iter().zip(shims) {
        match shim.join() {
            Ok(Ok(summaries)) => failures.extend(
                summaries
                    .iter()
                    .filter_map(|s| s.error.as_ref())
                    .map(|e| format!("{side}: {e}")),
            ),
            Ok(Err(e)) => failures.push(format!("{side}: {e}")),
            Err(_) => failures.push(format!("{side}: panicked")),
        }
    }
    if !failures.is_empty() {
        let said = failures.join("; ");
        note = Some(match note {
            Some(n) => format!("{n}; {said}"),
            None => said,
        });
    }
    Ok(MethodResult {
        method,
        round,
        converged,
        status,
        total_s: info["total-time"]
            .as_f64()
            .filter(|&t| converged && t > 0.0)
            .map(|t| t / 1e3),
        downtime_ms,
        qemu_downtime_ms: info["downtime"].as_f64(),
        setup_ms: info["setup-time"].as_f64(),
        wire_bytes: tx_after.saturating_sub(tx_before),
        qemu_transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
        cpu: Some(cpu),
        cpu_by_process,
        note,
    })
}

/// Runs every method of `config` in turn, `config.repeat` rounds, calling `progress` before
/// each run.
pub fn run(
    workspace: &Path,
    config: &QemuBenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<QemuBenchReport, String> {
    let guest = Guest::locate(workspace)?;
    let (tc_rate, bits) = match &config.link {
        Link::Shaped {
            tc_rate,
            bits_per_sec,
        } => (tc_rate.clone(), *bits_per_sec),
        Link::Loopback => {
            return Err("bench qemu needs a link rate (e.g. --link 1gbit): all methods must share one emulated link".into());
        }
    };
    progress("setting up the link");
    let pair = LinkPair::create_with_rtt(bits, (bits / 8 / 250).max(64 << 10), config.rtt)?;
    let dir = std::env::temp_dir().join(format!("ps-bench-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    for round in 1..=config.repeat {
        for &method in &config.methods {
            let of = if config.repeat > 1 {
                format!("round {round} of {}, ", config.repeat)
            } else {
                String::new()
            };
            progress(&format!(
                "{of}{}: booting two {} MiB guests and migrating",
                method.name(),
                config.memory_mib
            ));
            results.push(run_method(&guest, &pair, &dir, config, method, round)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let summary = summarize(&results, &config.methods);
    let comparison = compare(&results, &summary);
    let qemu = std::process::Command::new(config.qemu.program())
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    Ok(QemuBenchReport {
        link: tc_rate,
        link_mb_s: Some(bits as f64 / 8e6),
        rtt_ms: config.rtt.as_secs_f64() * 1e3,
        memory_mib: config.memory_mib,
        fill_mib: config.fill_mib,
        dirty_rate: config.dirty_rate,
        time_limit_s: config.time_limit.as_secs_f64(),
        repeat: config.repeat,
        prealloc_destination: config.prealloc_destination,
        results,
        summary,
        comparison,
        qemu,
        machine: crate::machine::describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: Method, round: u32, total_s: Option<f64>, downtime_ms: f64) -> MethodResult {
        MethodResult {
            method,
            round,
            converged: total_s.is_some(),
            status: if total_s.is_some() {
                "completed"
            } else {
                "cancelled"
            }
            .into(),
            total_s,
            downtime_ms: total_s.map(|_| downtime_ms),
            qemu_downtime_ms: None,
            setup_ms: Some(400.0),
            wire_bytes: 100 << 20,
            qemu_transferred: 0,
            // A cancelled run used the CPUs too, for the whole time limit.
            cpu: Some(CpuUse {
                busy_s: total_s.unwrap_or(60.0) * 1.5,
                idle_s: 1.0,
                steal_s: 0.0,
            }),
            cpu_by_process: Some(ProcessCpu {
                source_qemu_s: 1.0,
                destination_qemu_s: 2.0,
                shims_s: method.is_shim().then_some(3.0),
            }),
            note: None,
        }
    }

    #[test]
    fn a_spread_has_the_median_and_the_range() {
        assert_eq!(Spread::of([]), None);
        let odd = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of([4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn summaries_count_only_the_runs_that_completed() {
        let results = [
            run(Method::Native, 1, Some(5.0), 260.0),
            run(Method::Shim, 1, Some(2.5), 80.0),
            run(Method::Native, 2, None, 0.0),
            run(Method::Shim, 2, Some(2.7), 100.0),
        ];
        let summary = summarize(&results, &[Method::Native, Method::Shim]);
        assert_eq!(summary[0].method, Method::Native);
        assert_eq!((summary[0].runs, summary[0].converged), (2, 1));
        assert_eq!(summary[0].total_s.unwrap().median, 5.0);
        assert_eq!(summary[0].downtime_ms.unwrap().median, 260.0);
        assert_eq!(summary[0].setup_ms.unwrap().median, 400.0);
        assert_eq!(
            summary[1].total_s.unwrap(),
            Spread {
                median: 2.6,
                min: 2.5,
                max: 2.7
            }
        );
        assert_eq!(summary[1].wire_mib.unwrap().median, 100.0);
        // CPU time, like times, only of the runs that completed.
        assert_eq!(
            summary[0].cpu_busy_s.unwrap(),
            Spread {
                median: 7.5,
                min: 7.5,
                max: 7.5
            }
        );
        assert!((summary[1].cpu_busy_s.unwrap().median - 3.9).abs() < 1e-9);
        assert_eq!(summary[0].destination_qemu_cpu_s.unwrap().median, 2.0);
        assert_eq!(summary[0].shims_cpu_s, None, "native has no shims");
        assert_eq!(summary[1].shims_cpu_s.unwrap().median, 3.0);
    }

    #[test]
    fn the_shim_is_compared_by_medians_and_within_each_round() {
        let results = [
            run(Method::Native, 1, Some(5.0), 250.0),
            run(Method::MultifdZstd, 1, Some(2.0), 60.0),
            run(Method::Shim, 1, Some(2.5), 75.0),
            run(Method::Native, 2, Some(4.0), 250.0),
            run(Method::MultifdZstd, 2, Some(3.0), 60.0),
            run(Method::Shim, 2, Some(3.0), 125.0),
            // A round where native did not converge counts against the best QEMU alone.
            run(Method::Native, 3, None, 0.0),
            run(Method::MultifdZstd, 3, Some(2.5), 60.0),
            run(Method::Shim, 3, Some(2.0), 100.0),
        ];
        let methods = [Method::Native, Method::MultifdZstd, Method::Shim];
        let c = compare(&results, &summarize(&results, &methods));
        // Medians: shim 2.5, native 4.5, multifd + zstd 2.5; downtimes 100 and 250.
        assert_eq!(c.shim_vs_native_time, Some(2.5 / 4.5));
        assert_eq!(c.shim_vs_best_qemu_time, Some(1.0));
        assert_eq!(c.shim_vs_native_downtime, Some(0.4));
        assert_eq!(c.shim_vs_native_time_by_round, vec![0.5, 0.75]);
        assert_eq!(c.shim_vs_best_qemu_time_by_round, vec![1.25, 1.0, 0.8]);
    }

    #[test]
    fn qemu_setup_is_taken_out_of_the_time_after_setup() {
        let with_setup = |method, round, total_s, setup_ms| MethodResult {
            setup_ms: Some(setup_ms),
            ..run(method, round, Some(total_s), 100.0)
        };
        let results = [
            with_setup(Method::Native, 1, 5.0, 500.0),
            with_setup(Method::Shim, 1, 2.5, 700.0),
            with_setup(Method::Native, 2, 4.5, 300.0),
            with_setup(Method::Shim, 2, 2.3, 200.0),
            // No setup time from QEMU: that round's shim has no time after setup.
            MethodResult {
                setup_ms: None,
                ..run(Method::Shim, 3, Some(2.0), 100.0)
            },
            with_setup(Method::Native, 3, 4.0, 400.0),
        ];
        assert_eq!(results[0].after_setup_s(), Some(4.5));
        assert_eq!(results[4].after_setup_s(), None);
        let methods = [Method::Native, Method::Shim];
        let summary = summarize(&results, &methods);
        // Native 4.5, 4.2, 3.6; shim 1.8, 2.1.
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-9)
        };
        let native = summary[0].after_setup_s.unwrap();
        assert!(
            close(&[native.median, native.min, native.max], &[4.2, 3.6, 4.5]),
            "{native:?}"
        );
        let shim = summary[1].after_setup_s.unwrap();
        assert!(close(&[shim.median], &[1.95]), "{shim:?}");
        let c = compare(&results, &summary);
        assert!(close(
            &[c.shim_vs_native_after_setup.unwrap()],
            &[1.95 / 4.2]
        ));
        let by_round = &c.shim_vs_native_after_setup_by_round;
        assert!(close(by_round, &[0.4, 0.5]), "{by_round:?}");
        // The total times still count the setup.
        assert_eq!(c.shim_vs_native_time_by_round, vec![0.5, 2.3 / 4.5, 0.5]);
    }

    #[test]
    fn without_a_shim_run_nothing_is_compared() {
        let results = [run(Method::Native, 1, Some(5.0), 250.0)];
        let c = compare(&results, &summarize(&results, &[Method::Native]));
        assert_eq!(c, Comparison::default());
    }
}

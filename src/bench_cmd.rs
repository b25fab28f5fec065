//! `pagestream bench ...`: end-to-end benchmarks against their baselines.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use pagecodec::PAGE_SIZE;
use pagestream_benches::imagegen::{self, Mix, parse_size};
use pagestream_benches::transport_bench::{self, TransportBenchConfig, TransportBenchReport};
use pagestream_qemu_shim::vm::QemuBuild;

use crate::progress;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Stream a memory image through the transport, against raw bytes over one TCP socket.
    Transport(TransportArgs),
    /// Migrate a QEMU guest over an emulated link: QEMU alone (native, multifd+zstd, XBZRLE)
    /// and through the pagestream shims.
    Qemu(QemuArgs),
    /// Replay a recorded QEMU migration stream through the shims, without VMs, against the same
    /// stream over one TCP connection: what the shim pipeline itself costs per byte.
    Shim(ShimArgs),
}

#[derive(Args, Debug)]
pub struct ShimArgs {
    /// A recorded migration stream (QMP `migrate exec:cat > FILE`, or --record); without it,
    /// one is recorded from the test guest first (--mem, --fill, --dirty-rate).
    #[arg(long, conflicts_with = "record")]
    stream: Option<PathBuf>,
    /// Record the stream to this file and keep it (for later runs with --stream).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Guest memory of the recording, MiB.
    #[arg(long, default_value_t = 1024)]
    mem: u32,
    /// Memory the guest's workload fills before the recording, MiB.
    #[arg(long, default_value_t = 512)]
    fill: u32,
    /// Pages the workload dirties per second while QEMU writes the recording.
    #[arg(long, default_value_t = 2000)]
    dirty_rate: u32,
    /// Which QEMU records the stream: "system" or "10" (see `bench qemu --help`).
    #[arg(long, default_value = "system")]
    qemu: String,
    /// The link: unlimited (loopback), or a rate such as 10gbit (needs root: two network
    /// namespaces joined through a third one, a switch whose ports shape the link; removed
    /// afterwards).
    #[arg(long, default_value = "unlimited")]
    link: String,
    /// Methods to run, comma-separated: tcp (the stream over one TCP connection, as native
    /// QEMU), shim (parsing mode), shim-opaque.
    #[arg(long, default_value = "tcp,shim,shim-opaque")]
    methods: String,
    /// The shims' data channels (default: one per CPU, at least 2).
    #[arg(long)]
    channels: Option<u16>,
    /// Rounds: every method runs once per round, in order; figures are medians.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Print the shims' log lines to stderr.
    #[arg(long)]
    shim_log: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct QemuArgs {
    /// The emulated link, e.g. 1gbit (needs root: two network namespaces joined through a third
    /// one, a switch whose ports shape the link; removed afterwards).
    #[arg(long, default_value = "1gbit")]
    link: String,
    /// The link's round-trip time, milliseconds (0 to 1000): with it, the namespaces are joined
    /// by TUN devices and a delay line in this process instead of the switch, as two hosts a
    /// distance apart. 0: two hosts on one switch.
    #[arg(long, default_value_t = 0)]
    rtt: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    mem: u32,
    /// Memory the guest's workload fills, MiB.
    #[arg(long, default_value_t = 512)]
    fill: u32,
    /// Pages the workload dirties per second.
    #[arg(long, default_value_t = 2000)]
    dirty_rate: u32,
    /// Seconds after which a migration counts as not converging (and is cancelled).
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Methods to run, comma-separated: native, multifd (uncompressed), multifd-zstd, xbzrle,
    /// shim (parsing mode), shim-no-dest-multifd, shim-opaque, shim-multifd (multifd at both
    /// QEMUs, as `virsh migrate --parallel` sets it).
    #[arg(long, default_value = "native,multifd-zstd,xbzrle,shim")]
    methods: String,
    /// Rounds: every method runs once per round, in order; the report gives each method's
    /// median and range, and the shim's ratios both of the medians and round by round.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Print the shims' log lines (progress, summaries with pages by class) to stderr.
    #[arg(long)]
    shim_log: bool,
    /// Start every method's destination QEMU with its memory preallocated (-mem-prealloc, as
    /// for a VM backed by preallocated huge pages): the migration then writes into memory that
    /// is already backed, and the first-touch cost of fresh guest memory leaves the comparison.
    /// Not the configuration the targets are set for.
    #[arg(long)]
    prealloc_destination: bool,
    /// Which QEMU runs the VMs: "system" (qemu-system-x86_64 on the PATH) or "10" (the QEMU 10
    /// that scripts/install-qemu10.sh unpacks under target/qemu10/).
    #[arg(long, default_value = "system")]
    qemu: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct TransportArgs {
    /// A raw memory image to send; without it, one is generated (--size, --mix, --seed).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Size of the generated image.
    #[arg(long, default_value = "256M")]
    size: String,
    /// Content of the generated image (see `pagestream codec gen --help`).
    #[arg(long)]
    mix: Option<String>,
    /// Seed of the generated image.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Data channels (default: one per CPU, at least 2).
    #[arg(long)]
    channels: Option<u16>,
    /// The link: unlimited (loopback), or a rate such as 1gbit, 10gbit, 500mbit (needs root:
    /// two network namespaces joined through a third one, a switch whose ports shape the link;
    /// removed afterwards).
    #[arg(long, default_value = "unlimited")]
    link: String,
    /// Runs of each side; figures are medians.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// How much to compress: adaptive (as much as pays on this link), or a level: 0-100 the
    /// percentage of page groups compressed with LZ4, 101-200 all of them with level-100
    /// percent using zstd (200: all zstd).
    #[arg(long, default_value = "adaptive")]
    compression: String,
    /// Memory the source may hold in flight (queued pages and frames not yet sent), split
    /// over the channels; a slow link then slows the producer instead of growing buffers.
    #[arg(long, default_value = "16M")]
    inflight: String,
    /// Use blocking sockets instead of io_uring.
    #[arg(long)]
    blocking: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Transport(args) => transport(args),
        BenchCommand::Qemu(args) => qemu(args),
        BenchCommand::Shim(args) => shim(args),
    }
}

fn transport(args: TransportArgs) -> Result<()> {
    let link = transport_bench::parse_link(&args.link)
        .map_err(anyhow::Error::msg)
        .context("bad --link")?;
    let channels = channels_arg(args.channels)?;
    repeat_arg(args.repeat, 50)?;
    let image = match &args.image {
        Some(path) => {
            let mut bytes = fs::read(path)
                .with_context(|| format!("cannot read memory image {}", path.display()))?;
            if bytes.is_empty() {
                bail!("memory image {} is empty", path.display());
            }
            bytes.resize(bytes.len().div_ceil(PAGE_SIZE) * PAGE_SIZE, 0);
            bytes
        }
        None => {
            let size = parse_size(&args.size)
                .map_err(anyhow::Error::msg)
                .context("bad --size")?;
            if !(1 << 20..=16 << 30).contains(&size) {
                bail!("--size must be between 1M and 16G");
            }
            let mix = match &args.mix {
                Some(m) => m.parse::<Mix>().context("bad --mix")?,
                None => Mix::realistic(),
            };
            let bar = progress::bytes_bar(size, "generating the image");
            let (bytes, _) = imagegen::generate(&mix, size, args.seed, |d| bar.set_position(d));
            bar.finish_and_clear();
            bytes
        }
    };
    let config = TransportBenchConfig {
        channels,
        link,
        repeat: args.repeat,
        compression: parse_compression(&args.compression)?,
        inflight_bytes: parse_inflight(&args.inflight)?,
        blocking: args.blocking,
    };
    let report = progress::benchmarking(|step| transport_bench::run(&image, &config, step));
    let report = report.map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.verified {
        bail!("the received image differs from the one sent");
    }
    Ok(())
}

/// `--methods`: names from `all`, comma-separated, in the order given.
fn methods_arg<M: Copy>(text: &str, all: &[M], name: impl Fn(M) -> &'static str) -> Result<Vec<M>> {
    text.split(',')
        .map(|given| {
            all.iter()
                .copied()
                .find(|&m| name(m) == given.trim())
                .ok_or_else(|| {
                    let known: Vec<&str> = all.iter().map(|&m| name(m)).collect();
                    anyhow::anyhow!("unknown method '{given}' (known: {})", known.join(", "))
                })
        })
        .collect()
}

/// `--qemu`: "system" (qemu-system-x86_64 on the PATH) or "10" (the QEMU 10 that
/// scripts/install-qemu10.sh unpacked under `workspace`).
fn qemu_arg(text: &str, workspace: &std::path::Path) -> Result<QemuBuild> {
    match text {
        "system" => Ok(QemuBuild::System),
        "10" => QemuBuild::qemu10(workspace).map_err(anyhow::Error::msg),
        other => bail!("--qemu {other}: expected \"system\" or \"10\""),
    }
}

/// `--channels`, or one per CPU (at least 2) without it.
fn channels_arg(channels: Option<u16>) -> Result<u16> {
    let channels = channels.unwrap_or_else(pagestream_transport::default_channels);
    if channels == 0 || channels > 64 {
        bail!("--channels must be between 1 and 64");
    }
    Ok(channels)
}

/// Checks `--repeat` against its range, 1 to `max`.
fn repeat_arg(repeat: u32, max: u32) -> Result<()> {
    if repeat == 0 || repeat > max {
        bail!("--repeat must be between 1 and {max}");
    }
    Ok(())
}

/// Parses the source's in-flight memory budget, e.g. `16M` (1 MiB to 64 GiB).
pub fn parse_inflight(text: &str) -> Result<usize> {
    let bytes = parse_size(text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("bad --inflight '{text}'"))?;
    if !(1 << 20..=64 << 30).contains(&bytes) {
        bail!("--inflight must be between 1M and 64G, not '{text}'");
    }
    usize::try_from(bytes).context("--inflight does not fit this machine's address space")
}

/// Parses `adaptive` or a compression level (0 to 100: percentage of groups LZ4-compressed;
/// up to 200: all compressed, `level - 100` percent of them with zstd).
pub fn parse_compression(text: &str) -> Result<pagestream_transport::Compression> {
    if text == "adaptive" {
        return Ok(pagestream_transport::Compression::Adaptive);
    }
    match text.parse::<u32>() {
        Ok(level) if level <= pagestream_transport::sender::MAX_COMPRESSION_LEVEL => {
            Ok(pagestream_transport::Compression::Fixed(level))
        }
        _ => bail!(
            "--compression must be 'adaptive' or a level from 0 to 200 (0-100: share of page \
             groups compressed with LZ4; 101-200: all compressed, level-100 percent with zstd), \
             not '{text}'"
        ),
    }
}

fn print_report(r: &TransportBenchReport) {
    println!(
        "{} pages ({:.1} MiB) over {}, {} channels, {}",
        r.pages,
        r.raw_bytes as f64 / (1u64 << 20) as f64,
        r.link,
        r.channels,
        r.backend
    );
    println!("machine: {}", r.machine);
    println!("median of {} runs each, MB = 10^6 bytes\n", r.repeat);
    println!(
        "{:<32} {:>10} {:>12} {:>12}",
        "", "seconds", "effective", "on the wire"
    );
    println!(
        "{:<32} {:>10.3} {:>8.1} MB/s {:>8.1} MB/s",
        "pagestream", r.elapsed_s, r.effective_mb_s, r.wire_mb_s
    );
    println!(
        "{:<32} {:>10.3} {:>8.1} MB/s {:>8.1} MB/s",
        "raw bytes, one TCP socket", r.baseline_elapsed_s, r.baseline_mb_s, r.baseline_mb_s
    );
    if let Some(link) = r.link_mb_s {
        println!(
            "{:<32} {:>10} {:>12} {:>8.1} MB/s",
            "link rate", "", "", link
        );
    }
    if r.runs_s.len() > 1 {
        let spread = |runs: &[f64]| {
            format!(
                "{:.3}-{:.3} s",
                runs.first().copied().unwrap_or_default(),
                runs.last().copied().unwrap_or_default()
            )
        };
        println!(
            "runs: pagestream {}, raw socket {}",
            spread(&r.runs_s),
            spread(&r.baseline_runs_s)
        );
    }
    println!();
    print!("effective {:.2}x the raw baseline", r.effective_vs_baseline);
    if let Some(share) = r.wire_vs_link {
        print!("; wire {:.1}% of the link rate", share * 100.0);
    }
    println!("; verified: {}", if r.verified { "yes" } else { "NO" });
    let parts: Vec<String> = r
        .classes
        .iter()
        .filter(|(_, c)| c.pages > 0)
        .map(|(name, c)| format!("{name} {:.1}%", 100.0 * c.pages as f64 / r.pages as f64))
        .collect();
    println!(
        "pages: {}; compression level at the end, per channel: {:?} (0-100 LZ4 %, 101-200 zstd)",
        parts.join(", "),
        r.compression_level
    );
}

fn qemu(args: QemuArgs) -> Result<()> {
    use pagestream_benches::qemu_bench::{self, Method, QemuBenchConfig};
    let link = transport_bench::parse_link(&args.link)
        .map_err(anyhow::Error::msg)
        .context("bad --link")?;
    if args.fill >= args.mem || args.mem < 128 || args.mem > 16384 {
        bail!("--mem must be 128 to 16384 MiB and larger than --fill");
    }
    repeat_arg(args.repeat, 20)?;
    // A limit of 0 cancels every migration as it starts, which tells nothing about any method.
    if args.time_limit == 0 || args.time_limit > 3600 {
        bail!("--time-limit must be between 1 and 3600 seconds");
    }
    if args.rtt > 1000 {
        bail!("--rtt must be between 0 and 1000 milliseconds");
    }
    let methods = methods_arg(&args.methods, &Method::ALL, |m| m.name())?;
    let config = QemuBenchConfig {
        link,
        rtt: std::time::Duration::from_millis(args.rtt.into()),
        memory_mib: args.mem,
        fill_mib: args.fill,
        dirty_rate: args.dirty_rate,
        time_limit: std::time::Duration::from_secs(args.time_limit),
        methods,
        repeat: args.repeat,
        shim_log: args.shim_log,
        prealloc_destination: args.prealloc_destination,
        qemu: qemu_arg(&args.qemu, &std::env::current_dir()?)?,
    };
    let workspace = std::env::current_dir()?;
    let report = progress::benchmarking(|step| qemu_bench::run(&workspace, &config, step));
    let report = report.map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} MiB guest, {} MiB filled, {} dirty pages/s, over {} ({:.1} MB/s); {}",
        report.memory_mib,
        report.fill_mib,
        report.dirty_rate,
        report.link,
        report.link_mb_s.unwrap_or(0.0),
        report.qemu
    );
    println!("machine: {}", report.machine);
    if report.rtt_ms > 0.0 {
        println!(
            "round-trip time {} ms (TUN devices and a delay line; its CPU is left out of the shims')",
            report.rtt_ms
        );
    }
    if report.prealloc_destination {
        println!("destination QEMUs with their memory preallocated (-mem-prealloc)");
    }
    println!();
    let repeated = report.repeat > 1;
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>14} {:>17} {:>10} {:>10}",
        "method",
        "total s",
        "setup",
        "downtime",
        "on the wire",
        "CPU busy (idle)",
        "converged",
        "status"
    );
    for r in &report.results {
        let name = if repeated {
            format!("{} (round {})", r.method.name(), r.round)
        } else {
            r.method.name().to_string()
        };
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:>10.1} MiB {:>17} {:>10} {:>10}",
            name,
            r.total_s.map_or("-".into(), |t| format!("{t:.2}")),
            r.setup_ms.map_or("-".into(), |d| format!("{d:.0} ms")),
            r.downtime_ms.map_or("-".into(), |d| format!("{d:.0} ms")),
            r.wire_bytes as f64 / (1u64 << 20) as f64,
            r.cpu.map_or("-".into(), |c| format!(
                "{:.1} s ({:.1} s)",
                c.busy_s, c.idle_s
            )),
            if r.converged { "yes" } else { "no" },
            r.status
        );
    }
    for r in &report.results {
        if let Some(note) = &r.note {
            println!("{} (round {}): {note}", r.method.name(), r.round);
        }
    }
    if repeated {
        let spread = |s: Option<qemu_bench::Spread>, unit: &str, digits: usize| {
            s.map_or("-".into(), |s| {
                format!(
                    "{:.digits$} ({:.digits$}-{:.digits$}){unit}",
                    s.median, s.min, s.max
                )
            })
        };
        println!(
            "
median (range) of {} rounds:",
            report.repeat
        );
        println!(
            "{:<24} {:>20} {:>20} {:>22} {:>22} {:>20} {:>10}",
            "method",
            "total s",
            "after setup s",
            "downtime",
            "on the wire",
            "CPU busy s",
            "converged"
        );
        for s in &report.summary {
            println!(
                "{:<24} {:>20} {:>20} {:>22} {:>22} {:>20} {:>10}",
                s.method.name(),
                spread(s.total_s, "", 2),
                spread(s.after_setup_s, "", 2),
                spread(s.downtime_ms, " ms", 0),
                spread(s.wire_mib, " MiB", 0),
                spread(s.cpu_busy_s, "", 1),
                format!("{}/{}", s.converged, s.runs)
            );
        }
    }
    let median =
        |s: Option<qemu_bench::Spread>| s.map_or("-".into(), |s| format!("{:.1}", s.median));
    println!(
        "\nCPU seconds over the migration{}:\n{:<24} {:>12} {:>12} {:>17} {:>8}",
        if repeated { " (medians)" } else { "" },
        "method",
        "machine busy",
        "source QEMU",
        "destination QEMU",
        "shims"
    );
    for s in &report.summary {
        println!(
            "{:<24} {:>12} {:>12} {:>17} {:>8}",
            s.method.name(),
            median(s.cpu_busy_s),
            median(s.source_qemu_cpu_s),
            median(s.destination_qemu_cpu_s),
            median(s.shims_cpu_s)
        );
    }
    let c = &report.comparison;
    let by_round = |ratios: &[f64]| {
        qemu_bench::Spread::of(ratios.iter().copied())
            .filter(|_| repeated)
            .map_or(String::new(), |s| {
                format!(" (medians; round by round {:.2}-{:.2})", s.min, s.max)
            })
    };
    if let Some(x) = c.shim_vs_native_time {
        print!(
            "\nshim total time {x:.2}x native's{}",
            by_round(&c.shim_vs_native_time_by_round)
        );
        if let Some(b) = c.shim_vs_best_qemu_time {
            print!(
                ", {b:.2}x the best QEMU configuration's{}",
                by_round(&c.shim_vs_best_qemu_time_by_round)
            );
        }
        if let Some(d) = c.shim_vs_native_downtime {
            print!("; downtime {d:.2}x native's");
        }
        println!();
        if let Some(x) = c.shim_vs_native_after_setup {
            println!(
                "after QEMU's setup (its own work before the first page, alike for every method): \
                 shim {x:.2}x native's{}",
                by_round(&c.shim_vs_native_after_setup_by_round)
            );
        }
    }
    Ok(())
}

fn shim(args: ShimArgs) -> Result<()> {
    use pagestream_benches::shim_bench::{self, RecordConfig, ShimBenchConfig, ShimMethod};
    let link = transport_bench::parse_link(&args.link)
        .map_err(anyhow::Error::msg)
        .context("bad --link")?;
    let channels = channels_arg(args.channels)?;
    repeat_arg(args.repeat, 50)?;
    let methods = methods_arg(&args.methods, &ShimMethod::ALL, |m| m.name())?;
    let workspace = std::env::current_dir()?;
    let stream = match &args.stream {
        Some(path) => {
            fs::read(path).with_context(|| format!("cannot read the stream {}", path.display()))?
        }
        None => {
            if args.fill >= args.mem || args.mem < 128 || args.mem > 16384 {
                bail!("--mem must be 128 to 16384 MiB and larger than --fill");
            }
            let record = RecordConfig {
                memory_mib: args.mem,
                fill_mib: args.fill,
                dirty_rate: args.dirty_rate,
                qemu: qemu_arg(&args.qemu, &workspace)?,
            };
            let (path, keep) = match &args.record {
                Some(path) => (path.clone(), true),
                None => (
                    std::env::temp_dir()
                        .join(format!("ps-bench-shim-{}.stream", std::process::id())),
                    false,
                ),
            };
            let spinner = progress::spinner(&format!(
                "recording a migration of a {} MiB guest ({} MiB filled)",
                args.mem, args.fill
            ));
            let recorded = shim_bench::record(&workspace, &record, &path);
            spinner.finish_and_clear();
            let bytes = recorded.map_err(anyhow::Error::msg).and_then(|()| {
                fs::read(&path)
                    .with_context(|| format!("cannot read the recorded stream {}", path.display()))
            });
            if !keep {
                let _ = fs::remove_file(&path);
            }
            bytes?
        }
    };
    let reference = shim_bench::load(&mut &stream[..], None, Vec::new())
        .map_err(anyhow::Error::msg)
        .context("the stream is not a QEMU migration stream this bench can load")?;
    if reference.blocks.is_empty() || reference.page_records == 0 {
        bail!(
            "the stream holds no RAM pages ({} bytes): not a QEMU migration stream",
            stream.len()
        );
    }
    let config = ShimBenchConfig {
        link,
        methods,
        channels,
        repeat: args.repeat,
        shim_log: args.shim_log,
    };
    let stream = std::sync::Arc::new(stream);
    let report = progress::benchmarking(|step| shim_bench::run(stream, &reference, &config, step));
    let report = report.map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_shim_report(&report);
    }
    if !report.verified {
        bail!("a run did not deliver the recorded stream's memory and device state");
    }
    Ok(())
}

fn print_shim_report(r: &pagestream_benches::shim_bench::ShimBenchReport) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "a {:.1} MiB QEMU migration stream ({} page records, {:.0} MiB of RAM), over {}{}, \
         shims with {} channels",
        mib(r.stream_bytes),
        r.page_records,
        mib(r.ram_bytes),
        r.link,
        r.link_mb_s
            .map_or(String::new(), |m| format!(" ({m:.1} MB/s)")),
        r.channels
    );
    println!("machine: {}", r.machine);
    println!();
    println!(
        "{:<22} {:>9} {:>11} {:>13} {:>10} {:>11} {:>11} {:>9}",
        "method",
        "seconds",
        "stream MB/s",
        "on the wire",
        "CPU busy",
        "stand-ins",
        "shims",
        "verified"
    );
    for run in &r.runs {
        println!(
            "{:<22} {:>9.3} {:>11.0} {:>9.1} MiB {:>8.2} s {:>9.2} s {:>9.2} s {:>9}",
            format!("{} (round {})", run.method.name(), run.round),
            run.seconds,
            run.stream_mb_s,
            mib(run.wire_bytes),
            run.cpu.busy_s,
            run.stand_ins_cpu_s,
            run.shims_cpu_s,
            if run.verified { "yes" } else { "NO" }
        );
    }
    for run in &r.runs {
        if let Some(note) = &run.note {
            println!("{} (round {}): {note}", run.method.name(), run.round);
        }
    }
    let spread = |s: Option<pagestream_benches::qemu_bench::Spread>, digits: usize| {
        s.map_or("-".into(), |s| {
            format!(
                "{:.digits$} ({:.digits$}-{:.digits$})",
                s.median, s.min, s.max
            )
        })
    };
    let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}x"));
    println!("\nmedian (range) of {} rounds:", r.repeat);
    println!(
        "{:<14} {:>22} {:>22} {:>22} {:>24} {:>9} {:>8} {:>9}",
        "method",
        "seconds",
        "CPU busy s",
        "CPU-s/GiB",
        "shims' CPU-s/GiB",
        "time/tcp",
        "CPU/tcp",
        "verified"
    );
    for s in &r.summary {
        println!(
            "{:<14} {:>22} {:>22} {:>22} {:>24} {:>9} {:>8} {:>9}",
            s.method.name(),
            spread(s.seconds, 3),
            spread(s.cpu_busy_s, 2),
            spread(s.cpu_s_per_gib, 2),
            spread(s.shims_cpu_s_per_gib, 2),
            ratio(s.time_vs_tcp),
            ratio(s.cpu_vs_tcp),
            format!("{}/{}", s.verified, s.runs)
        );
    }
    println!(
        "(CPU busy: the whole machine; stand-ins: the source's writes and the loader's reads and \
         copies, what the QEMUs would spend; shims: the rest of this process)"
    );
    if let Some(mode) = r.runs.iter().find_map(|run| {
        (run.method == pagestream_benches::shim_bench::ShimMethod::Shim)
            .then_some(run.mode.as_ref())
            .flatten()
    }) {
        println!("\nshim mode: {mode}");
    }
}

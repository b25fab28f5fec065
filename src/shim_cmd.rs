//! `pagestream shim send|recv`: QEMU's migration through pagestream.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use pagestream_qemu_shim::destination::{DestinationConfig, run_destination};
use pagestream_qemu_shim::endpoint::Endpoint;
use pagestream_qemu_shim::link::{Compression, Key};
use pagestream_qemu_shim::multifd::QemuMultifd;
use pagestream_qemu_shim::session::{Summary, SummarySink};
use pagestream_qemu_shim::source::{Mode, SourceConfig, run_source};
use pagestream_transport::net::stderr_log;

use crate::codec_cmd::size_arg;

#[derive(Subcommand, Debug)]
pub enum ShimCommand {
    /// Source host: QEMU migrates to --listen, the stream goes to the destination shim.
    Send(SendArgs),
    /// Destination host: receives from the source shim and feeds the destination QEMU.
    Recv(RecvArgs),
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Where QEMU migrates to: unix:PATH (QMP `migrate uri=unix:PATH`) or tcp:HOST:PORT.
    #[arg(long)]
    listen: String,
    /// The destination shim, HOST:PORT.
    #[arg(long)]
    to: String,
    /// Pre-shared key (at least 16 bytes), the same file on both hosts.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Compression of what is carried opaque: auto (zstd while the link is the bottleneck, LZ4
    /// otherwise), lz4 or zstd.
    #[arg(long, default_value = "auto")]
    compression: String,
    /// auto: the main channel in parsing mode (RAM pages through the page codec and several
    /// channels) whenever its stream can be parsed, opaque otherwise; opaque: always as bytes.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Data channels of parsing mode (default: one per CPU, 2 to 8).
    #[arg(long)]
    channels: Option<u16>,
    /// Parsing mode: memory for the page codec's content cache at each end (pages that repeat
    /// one sent earlier go as a reference), e.g. 64M; 0 turns it off. The destination shim
    /// takes the same size. Together with --delta-cache at most 1G.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    dup_cache: String,
    /// Parsing mode: memory for the delta cache at each end (a page sent again goes as its
    /// difference from the version before), e.g. 64M; 0 turns deltas off.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    delta_cache: String,
    /// Seconds the destination shim may stay unreachable (a network partition sends no reset)
    /// before the migration fails and QEMU is told (1 to 3600).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    link_timeout: u64,
    /// Also append each migration's summary to PATH, as one line of JSON (for programs).
    #[arg(long, value_name = "PATH")]
    summary_json: Option<PathBuf>,
    /// Exit after one migration.
    #[arg(long)]
    once: bool,
}

#[derive(Args, Debug)]
pub struct RecvArgs {
    /// Where the source shim connects, ADDR:PORT.
    #[arg(long)]
    listen: String,
    /// The destination QEMU's incoming socket: unix:PATH (`-incoming unix:PATH`) or
    /// tcp:HOST:PORT.
    #[arg(long)]
    qemu: String,
    /// Pre-shared key (at least 16 bytes), the same file on both hosts.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Without a key, accept source shims that are not on this host. Anyone who can reach the
    /// port could then feed memory into the VM: use only on a trusted network.
    #[arg(long)]
    allow_remote_without_key: bool,
    /// The destination QEMU loads pages over N multifd channels of its own, each on its own
    /// thread (parsing mode; the source QEMU needs no multifd). Before `migrate-incoming`, set
    /// on the destination QEMU: capability `multifd` on, `multifd-channels` N,
    /// `multifd-compression` none. QEMU 7.2's multifd format.
    #[arg(long, value_name = "N")]
    qemu_multifd: Option<u8>,
    /// The destination QEMU's uuid (its -uuid), which its multifd channels check. Default: QEMU's
    /// default, all zero.
    #[arg(long, value_name = "UUID", requires = "qemu_multifd")]
    qemu_uuid: Option<String>,
    /// Seconds the source shim may stay unreachable before the migration fails and the
    /// destination QEMU's connection is closed (1 to 3600).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    link_timeout: u64,
    /// Also append each migration's summary to PATH, as one line of JSON (for programs).
    #[arg(long, value_name = "PATH")]
    summary_json: Option<PathBuf>,
    /// Exit after one migration.
    #[arg(long)]
    once: bool,
}

fn compression(text: &str) -> Result<Compression> {
    Ok(match text {
        "auto" => Compression::Auto,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => bail!("--compression must be auto, lz4 or zstd, not '{other}'"),
    })
}

fn key(path: &Option<PathBuf>) -> Result<Option<Key>> {
    path.as_deref()
        .map(Key::from_file)
        .transpose()
        .map_err(anyhow::Error::msg)
}

/// Appends each summary to `path` as a line of JSON. The file is opened now, so that a path
/// that cannot be written fails at start-up rather than after a migration.
fn summary_sink(path: Option<&std::path::Path>) -> Result<Option<SummarySink>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open --summary-json {}", path.display()))?;
    let file = std::sync::Mutex::new(file);
    let path = path.to_path_buf();
    Ok(Some(std::sync::Arc::new(
        move |side: &str, summary: &Summary| {
            use std::io::Write;
            let line = format!("{}\n", summary.to_json(side));
            let mut file = file.lock().expect("not poisoned");
            if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
                eprintln!(
                    "pagestream: cannot write the summary to {}: {e}",
                    path.display()
                );
            }
        },
    )))
}

fn link_timeout(secs: u64) -> Result<std::time::Duration> {
    if !(1..=3600).contains(&secs) {
        bail!("--link-timeout must be between 1 and 3600 seconds, not {secs}");
    }
    Ok(std::time::Duration::from_secs(secs))
}

pub fn run(cmd: ShimCommand) -> Result<()> {
    let summaries = match cmd {
        ShimCommand::Send(args) => {
            let listen: Endpoint = args.listen.parse().map_err(anyhow::Error::msg)?;
            run_source(SourceConfig {
                listen,
                to: args.to,
                key: key(&args.key_file)?,
                compression: compression(&args.compression)?,
                mode: match args.mode.as_str() {
                    "auto" => Mode::Auto,
                    "opaque" => Mode::Opaque,
                    other => bail!("--mode must be auto or opaque, not '{other}'"),
                },
                channels: match args.channels {
                    Some(n @ 1..=64) => n,
                    Some(n) => bail!("--channels must be between 1 and 64, not {n}"),
                    None => pagestream_transport::default_channels(),
                },
                dup_cache_bytes: size_arg("dup-cache", &args.dup_cache)?,
                delta_cache_bytes: size_arg("delta-cache", &args.delta_cache)?,
                link_timeout: link_timeout(args.link_timeout)?,
                on_summary: summary_sink(args.summary_json.as_deref())?,
                once: args.once,
                log: stderr_log(),
            })
        }
        ShimCommand::Recv(args) => {
            let qemu: Endpoint = args.qemu.parse().map_err(anyhow::Error::msg)?;
            run_destination(DestinationConfig {
                listen: args.listen,
                qemu,
                key: key(&args.key_file)?,
                allow_remote_without_key: args.allow_remote_without_key,
                compression: Compression::Auto,
                qemu_multifd: match args.qemu_multifd {
                    None => None,
                    Some(0) => bail!("--qemu-multifd must be at least 1 (QEMU's multifd-channels)"),
                    Some(channels) => Some(QemuMultifd {
                        channels,
                        uuid: match &args.qemu_uuid {
                            Some(text) => QemuMultifd::parse_uuid(text)
                                .map_err(anyhow::Error::msg)
                                .context("bad --qemu-uuid")?,
                            None => [0; 16],
                        },
                    }),
                },
                link_timeout: link_timeout(args.link_timeout)?,
                on_summary: summary_sink(args.summary_json.as_deref())?,
                once: args.once,
                log: stderr_log(),
            })
        }
    }
    .map_err(anyhow::Error::msg)?;
    if let Some(failed) = summaries.iter().find_map(|s| s.error.as_ref()) {
        bail!("the migration failed: {failed}");
    }
    Ok(())
}

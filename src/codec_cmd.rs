//! `pagestream codec ...`: synthetic images and the codec benchmark.

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use pagecodec::PAGE_SIZE;
use pagestream_benches::codec_bench::{self, CodecBenchConfig, CodecBenchReport};
use pagestream_benches::imagegen::{self, ContentKind, Mix, parse_size};

use crate::progress;

#[derive(Subcommand, Debug)]
pub enum CodecCommand {
    /// Write a synthetic guest memory image.
    Gen(GenArgs),
    /// Encode and decode every page of a memory image, against zstd-1 and LZ4 in the same run.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct GenArgs {
    /// Content proportions, e.g. zero=30,text=16,ints=12,ptrs=12,code=10,random=8,dup=12
    /// (kinds: zero, text, ints, ptrs, code, random, dup). Default: a realistic guest.
    #[arg(long)]
    mix: Option<String>,
    /// Image size, e.g. 256M or 1G.
    #[arg(long, default_value = "256M")]
    size: String,
    /// Seed of the generator: the same seed gives the same image.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the image.
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A raw memory image: a QEMU `pmemsave` dump, a core file, `codec gen` output.
    #[arg(long)]
    image: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Encoder and decoder threads (one codec stream each); the baselines use as many.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Runs of each codec; speeds reported are medians.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Content (duplicate) cache budget, e.g. 64M; 0 turns it off.
    #[arg(long, default_value = "64M")]
    dup_cache: String,
    /// Delta cache budget; 0 turns deltas off.
    #[arg(long, default_value = "64M")]
    delta_cache: String,
    /// Compress page groups with zstd (level 1) instead of LZ4: the codec's mode for slow links.
    #[arg(long)]
    zstd: bool,
}

pub fn run(cmd: CodecCommand) -> Result<()> {
    match cmd {
        CodecCommand::Gen(args) => generate(args),
        CodecCommand::Bench(args) => bench(args),
    }
}

/// A size option's value (`4096`, `64K`, `256M`, `1G`), or an error that names the option.
pub(crate) fn size_arg(name: &str, value: &str) -> Result<u64> {
    parse_size(value)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("bad --{name}"))
}

fn generate(args: GenArgs) -> Result<()> {
    let mix = match &args.mix {
        Some(m) => m.parse::<Mix>().context("bad --mix")?,
        None => Mix::realistic(),
    };
    let size = size_arg("size", &args.size)?;
    if size == 0 {
        bail!("--size must be at least one page ({PAGE_SIZE} bytes)");
    }
    let bar = progress::bytes_bar(size, "generating");
    let (image, composition) =
        imagegen::generate(&mix, size, args.seed, |done| bar.set_position(done));
    bar.finish_and_clear();
    fs::write(&args.output, &image)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let pages = image.len() / PAGE_SIZE;
    println!(
        "wrote {} ({} pages, mix {mix}, seed {})",
        args.output.display(),
        pages,
        args.seed
    );
    for (kind, n) in ContentKind::ALL.iter().zip(composition.pages) {
        if n > 0 {
            println!(
                "  {:<7} {:>9} pages ({:.1}%)",
                kind.name(),
                n,
                100.0 * n as f64 / pages as f64
            );
        }
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.threads == 0 || args.threads > 256 {
        bail!("--threads must be between 1 and 256");
    }
    if args.repeat == 0 || args.repeat > 100 {
        bail!("--repeat must be between 1 and 100");
    }
    let config = CodecBenchConfig {
        threads: args.threads,
        repeat: args.repeat,
        dup_cache_bytes: size_arg("dup-cache", &args.dup_cache)?,
        delta_cache_bytes: size_arg("delta-cache", &args.delta_cache)?,
        zstd_share: if args.zstd { 100 } else { 0 },
    };
    for (name, bytes) in [
        ("dup-cache", config.dup_cache_bytes),
        ("delta-cache", config.delta_cache_bytes),
    ] {
        if bytes > 64 << 30 {
            bail!("--{name} of {bytes} bytes is more than the 64 GiB this command allows");
        }
    }
    let mut image = fs::read(&args.image)
        .with_context(|| format!("cannot read memory image {}", args.image.display()))?;
    if image.is_empty() {
        bail!("memory image {} is empty", args.image.display());
    }
    let padded = image.len() % PAGE_SIZE != 0;
    image.resize(image.len().div_ceil(PAGE_SIZE) * PAGE_SIZE, 0);
    if padded && !args.json {
        eprintln!("note: the image is not a whole number of pages; the last page is zero-padded");
    }
    let report = progress::benchmarking(|step| codec_bench::run(&image, &config, step));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&args.image, &report)?;
    }
    if !report.roundtrip_ok {
        bail!("round trip FAILED: the decoded image differs from the input");
    }
    Ok(())
}

fn print_report(path: &std::path::Path, r: &CodecBenchReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} pages, {:.1} MiB",
        path.display(),
        r.pages,
        r.raw_bytes as f64 / (1 << 20) as f64
    )?;
    writeln!(out, "machine: {}", r.machine)?;
    writeln!(
        out,
        "threads: {}, median of {} runs, MB = 10^6 bytes",
        r.threads, r.repeat
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<18} {:>14} {:>7} {:>12} {:>12} {:>9}",
        "codec", "wire bytes", "ratio", "encode MB/s", "decode MB/s", "roundtrip"
    )?;
    let row = |out: &mut std::io::StdoutLock<'_>,
               name: &str,
               wire: u64,
               ratio: f64,
               enc: f64,
               dec: f64,
               ok: bool| {
        writeln!(
            out,
            "{name:<18} {wire:>14} {ratio:>7.2} {enc:>12.0} {dec:>12.0} {:>9}",
            if ok { "ok" } else { "FAILED" }
        )
    };
    row(
        &mut out,
        "pagestream",
        r.wire_bytes,
        r.ratio,
        r.encode_mb_s,
        r.decode_mb_s,
        r.roundtrip_ok,
    )?;
    row(
        &mut out,
        "zstd -1 per page",
        r.zstd1.wire_bytes,
        r.zstd1.ratio,
        r.zstd1.encode_mb_s,
        r.zstd1.decode_mb_s,
        r.zstd1.roundtrip_ok,
    )?;
    row(
        &mut out,
        "lz4 per page",
        r.lz4.wire_bytes,
        r.lz4.ratio,
        r.lz4.encode_mb_s,
        r.lz4.decode_mb_s,
        r.lz4.roundtrip_ok,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "encode speed {:.2}x zstd-1; wire bytes {:.3}x zstd-1, {:.3}x lz4",
        r.encode_speedup_vs_zstd1, r.wire_vs_zstd1, r.wire_vs_lz4
    )?;
    writeln!(
        out,
        "encoder setup (caches made resident, not in the encode speed): {:.1} ms median, {:.1} ms first",
        r.encode_setup_ms, r.encode_setup_max_ms
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<10} {:>10} {:>8} {:>14}",
        "class", "pages", "share", "wire bytes"
    )?;
    for (name, c) in &r.classes {
        writeln!(
            out,
            "{name:<10} {:>10} {:>7.1}% {:>14}",
            c.pages,
            100.0 * c.pages as f64 / r.pages as f64,
            c.wire_bytes
        )?;
    }
    Ok(())
}

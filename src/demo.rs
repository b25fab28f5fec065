//! `pagestream demo`: a guest's memory migrated over loopback TCP through the transport and the
//! page codec in three passes, with the guest writing to its memory between passes, and the
//! destination checked page for page.

use std::net::TcpListener;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use pagecodec::{ClassCounts, MemoryImage, PAGE_SIZE, PageAddr, PageClass};
use pagestream_benches::imagegen::{self, ContentKind, Mix, Rng, parse_size};
use pagestream_transport::channel::DEFAULT_MAX_FRAME_BODY;
use pagestream_transport::net::stderr_log;
use pagestream_transport::{
    Compression, PageSource, ReceiveSummary, ReceiverConfig, Sender, SenderConfig, StatsSnapshot,
    TcpAcceptor, TcpBackend, TcpConnector, accept, default_channels,
};

use crate::progress;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size, e.g. 256M or 1G.
    #[arg(long, default_value = "256M")]
    size: String,
    /// Seed of the generated memory and of the guest's writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Data channels (each with an encoder thread on the source and a decoder thread on the
    /// destination). Default: one per CPU, at least 2.
    #[arg(long)]
    channels: Option<u16>,
    /// How much to compress: adaptive (as much as pays on this link), or a level: 0-100 the
    /// percentage of page groups compressed with LZ4, 101-200 all of them with level-100
    /// percent using zstd (200: all zstd).
    #[arg(long, default_value = "adaptive")]
    compression: String,
    /// Memory the source may hold in flight (queued pages and frames not yet sent), split
    /// over the channels.
    #[arg(long, default_value = "16M")]
    inflight: String,
}

/// Share of memory the guest dirties before each later pass, in percent.
const DIRTY_PERCENT: [u64; 2] = [10, 2];
/// Share of memory that takes most of the guest's writes.
const HOT_PERCENT: u64 = 8;

pub fn run(args: DemoArgs) -> Result<()> {
    let size = parse_size(&args.size)
        .map_err(anyhow::Error::msg)
        .context("bad --size")?;
    if !(1 << 20..=64 << 30).contains(&size) {
        bail!("--size must be between 1M and 64G");
    }
    let channels = args.channels.unwrap_or_else(default_channels);
    if channels == 0 || channels > 64 {
        bail!("--channels must be between 1 and 64");
    }
    let compression = crate::bench_cmd::parse_compression(&args.compression)?;
    let inflight_bytes = crate::bench_cmd::parse_inflight(&args.inflight)?;
    let log = stderr_log();
    let backend = TcpBackend::detect(&log);

    println!(
        "pagestream demo: live-migrating {} of guest memory over loopback TCP ({}), {} channels",
        human_bytes(size),
        backend.name(),
        channels
    );
    println!(
        "(the guest writes to {}% and then {}% of its memory between passes)\n",
        DIRTY_PERCENT[0], DIRTY_PERCENT[1]
    );

    let bar = progress::bytes_bar(size, "generating guest memory");
    let (bytes, _) =
        imagegen::generate(&Mix::realistic(), size, args.seed, |d| bar.set_position(d));
    bar.finish();
    // Guest memory the channel workers read themselves (`Sender::send_shared`), as they would a
    // VMM's; the guest writes to it between passes.
    let source = Arc::new(RwLock::new(MemoryImage::from_bytes(bytes)));
    let layout = read(&source).layout().clone();
    let mut dest = MemoryImage::zeroed(layout.clone());
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on loopback")?;
    let addr = listener.local_addr()?;

    let (sent, received) = std::thread::scope(|scope| {
        let dest = &mut dest;
        let receiver_log = log.clone();
        let receiver = scope.spawn(move || -> Result<ReceiveSummary> {
            let mut acceptor = TcpAcceptor::new(
                listener,
                backend,
                DEFAULT_MAX_FRAME_BODY,
                receiver_log.clone(),
            );
            let config = ReceiverConfig {
                log: receiver_log,
                ..ReceiverConfig::default()
            };
            let pending = accept(&mut acceptor, &config)?;
            let sinks = dest.shard_writers(pending.shard_map());
            Ok(pending.run(&mut acceptor, sinks, |_| {})?)
        });
        let session = Session {
            addr,
            backend,
            channels,
            compression,
            inflight_bytes,
            log: log.clone(),
        };
        let sent = migrate(&source, layout, &session, args.seed);
        let received = receiver
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the destination thread panicked")));
        (sent, received)
    });
    let Migrated { passes, levels } = sent.context("the source failed")?;
    received.context("the destination failed")?;

    let spinner = progress::spinner("comparing destination memory with the source");
    let identical = dest == *read(&source);
    spinner.finish_and_clear();
    print_report(&passes, size);
    println!(
        "compression level at the end, per channel: {levels:?} (0-100: share of page groups \
         compressed with LZ4; 101-200: all of them, level-100 percent with zstd){}",
        if levels.iter().all(|&l| l == 0) {
            "; on this link sending pages raw is faster than compressing them \
             (--compression 100 compresses everything with LZ4, 200 with zstd)"
        } else {
            ""
        }
    );
    if !identical {
        bail!("destination memory differs from the source: the migration is WRONG");
    }
    println!(
        "\nverified: all {} destination pages are identical to the source",
        size.div_ceil(PAGE_SIZE as u64)
    );
    Ok(())
}

/// What the source moved: each pass, and the compression level each channel ended with.
struct Migrated {
    passes: Vec<(String, PassStats)>,
    levels: Vec<u64>,
}

/// How the source connects.
struct Session {
    addr: std::net::SocketAddr,
    backend: TcpBackend,
    channels: u16,
    compression: Compression,
    inflight_bytes: usize,
    log: pagestream_transport::net::Log,
}

/// The source side: three passes, the guest writing in between, each pass confirmed applied.
fn migrate(
    source: &Arc<RwLock<MemoryImage>>,
    layout: pagecodec::MemoryLayout,
    session: &Session,
    seed: u64,
) -> Result<Migrated> {
    let connector = TcpConnector::new(session.addr, session.backend, Duration::from_secs(10));
    let config = SenderConfig {
        channels: session.channels,
        compression: session.compression,
        inflight_bytes: session.inflight_bytes,
        log: session.log.clone(),
        ..SenderConfig::default()
    };
    let mut sender = Sender::connect(Box::new(connector), layout, config)?;
    let mut rng = Rng::new(seed ^ 0xd1e7);
    let mut passes = Vec::new();
    let memory: Arc<dyn PageSource> = source.clone();
    let mut dirty: Vec<PageAddr> = read(source).addresses().collect();
    for generation in 0..=DIRTY_PERCENT.len() as u32 {
        let last = generation as usize == DIRTY_PERCENT.len();
        let label = if generation == 0 {
            "pass 0: all memory".to_string()
        } else if last {
            format!("pass {generation}: stop and copy")
        } else {
            format!("pass {generation}: dirty pages")
        };
        let bar = progress::bytes_bar(dirty.len() as u64 * PAGE_SIZE as u64, &label);
        let before = sender.stats();
        let started = Instant::now();
        let queued = dirty.iter().enumerate().map(|(i, &addr)| {
            if i % 256 == 0 {
                bar.set_position(i as u64 * PAGE_SIZE as u64);
            }
            addr
        });
        sender.send_shared(&memory, generation, queued)?;
        sender.end_pass(generation)?;
        sender.wait_applied(generation)?;
        bar.set_position(dirty.len() as u64 * PAGE_SIZE as u64);
        bar.finish();
        passes.push((
            label,
            PassStats::between(&before, &sender.stats(), started.elapsed()),
        ));
        if !last {
            let mut guest = source.write().unwrap_or_else(PoisonError::into_inner);
            dirty = guest_writes(&mut guest, &mut rng, DIRTY_PERCENT[generation as usize]);
        }
    }
    let summary = sender.finish()?;
    let levels = summary
        .stats
        .channels
        .iter()
        .map(|c| c.compression_level)
        .collect();
    Ok(Migrated { passes, levels })
}

/// The guest's memory, to read.
fn read(memory: &RwLock<MemoryImage>) -> std::sync::RwLockReadGuard<'_, MemoryImage> {
    memory.read().unwrap_or_else(PoisonError::into_inner)
}

/// What one pass moved.
#[derive(Debug, Default, Clone, Copy)]
struct PassStats {
    pages: u64,
    wire_bytes: u64,
    classes: ClassCounts,
    elapsed: Duration,
}

impl PassStats {
    fn between(before: &StatsSnapshot, after: &StatsSnapshot, elapsed: Duration) -> Self {
        let mut classes = ClassCounts::default();
        for class in PageClass::ALL {
            classes.add(
                class,
                after.classes.pages(class) - before.classes.pages(class),
                after.classes.wire_bytes(class) - before.classes.wire_bytes(class),
            );
        }
        Self {
            pages: after.pages() - before.pages(),
            wire_bytes: after.wire_bytes() - before.wire_bytes(),
            classes,
            elapsed,
        }
    }
}

/// The guest at work: it writes to about `percent`% of its pages, in clusters, the way programs
/// do, and returns the pages dirty tracking would report (sorted, as a scan of the dirty bitmap
/// yields them). Most writes land in a hot working set (the first [`HOT_PERCENT`]% of memory
/// from a seeded offset), the rest anywhere. Many writes change a few words (counters,
/// pointers); some pages are rewritten with the bytes they held (dirty tracking's false
/// positives); some get new content, are freed (zeroed) or receive a copy of another page.
fn guest_writes(memory: &mut MemoryImage, rng: &mut Rng, percent: u64) -> Vec<PageAddr> {
    let pages = memory.layout().total_pages();
    let target = pages * percent / 100;
    let hot = (pages * HOT_PERCENT / 100).max(1);
    let hot_start = pages / 3;
    let mut dirty = std::collections::BTreeSet::new();
    let started = Instant::now();
    while (dirty.len() as u64) < target && started.elapsed() < Duration::from_secs(30) {
        let start = if rng.chance(80) && hot_start + hot <= pages {
            hot_start + rng.below(hot)
        } else {
            rng.below(pages)
        };
        let run = (1 + rng.small(5)).min(pages - start);
        for index in start..start + run {
            let addr = PageAddr::new(0, index);
            dirty.insert(addr);
            let action = rng.below(100);
            if action < 30 {
                continue; // rewritten with the same bytes
            }
            if action < 90 {
                // Copy another page before borrowing this one mutably.
                let copy_from = (action >= 85).then(|| {
                    *memory
                        .page(PageAddr::new(0, rng.below(pages)))
                        .expect("address inside the image")
                });
                let page = memory.page_mut(addr).expect("address inside the image");
                match (action, copy_from) {
                    (_, Some(other)) => *page = other,
                    (0..65, _) => {
                        for _ in 0..1 + rng.small(3) {
                            let word = rng.below((PAGE_SIZE / 8) as u64) as usize * 8;
                            let v = u64::from_le_bytes(page[word..word + 8].try_into().unwrap());
                            page[word..word + 8]
                                .copy_from_slice(&v.wrapping_add(1 + rng.small(8)).to_le_bytes());
                        }
                    }
                    (65..75, _) => page.fill(0),
                    _ => {
                        let kind = [ContentKind::Text, ContentKind::Ints, ContentKind::Pointers]
                            [rng.below(3) as usize];
                        imagegen::fill(kind, rng, page);
                    }
                }
            } else {
                let page = memory.page_mut(addr).expect("address inside the image");
                imagegen::fill(ContentKind::Random, rng, page);
            }
        }
    }
    dirty.into_iter().collect()
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn print_report(passes: &[(String, PassStats)], size: u64) {
    println!();
    println!(
        "{:<26} {:>8} {:>10} {:>10} {:>7} {:>9}",
        "", "pages", "raw", "on wire", "ratio", "MB/s"
    );
    let mut total = PassStats::default();
    for (label, s) in passes {
        print_row(label, s);
        total.pages += s.pages;
        total.wire_bytes += s.wire_bytes;
        total.classes.merge(&s.classes);
        total.elapsed += s.elapsed;
    }
    print_row("total", &total);
    println!("\npages by class (share of the pages each pass sent):");
    for (label, s) in passes
        .iter()
        .map(|(l, s)| (l.as_str(), s))
        .chain([("total", &total)])
    {
        let parts: Vec<String> = PageClass::ALL
            .iter()
            .filter(|&&c| s.classes.pages(c) > 0)
            .map(|&c| {
                format!(
                    "{} {:.1}%",
                    c.name(),
                    100.0 * s.classes.pages(c) as f64 / s.pages.max(1) as f64
                )
            })
            .collect();
        println!("  {label:<24} {}", parts.join(", "));
    }
    println!(
        "\nguest memory {}; {} moved in {:.2} s as {} on the wire",
        human_bytes(size),
        human_bytes(total.pages * PAGE_SIZE as u64),
        total.elapsed.as_secs_f64(),
        human_bytes(total.wire_bytes)
    );
}

fn print_row(label: &str, s: &PassStats) {
    let raw = s.pages * PAGE_SIZE as u64;
    println!(
        "{:<26} {:>8} {:>10} {:>10} {:>7.2} {:>9.0}",
        label,
        s.pages,
        human_bytes(raw),
        human_bytes(s.wire_bytes),
        raw as f64 / s.wire_bytes.max(1) as f64,
        raw as f64 / s.elapsed.as_secs_f64().max(1e-9) / 1e6
    );
}

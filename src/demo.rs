//! `pagestream demo`: a guest's memory migrated through the page codec in three passes, with the
//! guest writing to its memory between passes, and the destination checked page for page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use pagecodec::{MemoryImage, PAGE_SIZE, PageAddr, PageClass};
use pagestream_benches::imagegen::{self, ContentKind, Mix, Rng, parse_size};

use crate::migrate::{Migration, PassStats};
use crate::progress;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size, e.g. 256M or 1G.
    #[arg(long, default_value = "256M")]
    size: String,
    /// Seed of the generated memory and of the guest's writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Codec streams (each with an encoder and a decoder thread). Default: one per CPU.
    #[arg(long)]
    streams: Option<u32>,
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
    let streams = args.streams.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8) as u32)
    });
    if streams == 0 || streams > 64 {
        bail!("--streams must be between 1 and 64");
    }

    println!(
        "pagestream demo: live-migrating {} of guest memory through the page codec, {} streams",
        human_bytes(size),
        streams
    );
    println!(
        "(the guest writes to {}% and then {}% of its memory between passes)\n",
        DIRTY_PERCENT[0], DIRTY_PERCENT[1]
    );

    let bar = progress::bytes_bar(size, "generating guest memory");
    let (bytes, _) =
        imagegen::generate(&Mix::realistic(), size, args.seed, |d| bar.set_position(d));
    bar.finish();
    let mut source = MemoryImage::from_bytes(bytes);
    let mut dest = MemoryImage::zeroed(source.layout().clone());
    let mut migration = Migration::new(&source, streams, args.seed.wrapping_mul(0x9e37_79b9))?;
    let mut rng = Rng::new(args.seed ^ 0xd1e7);

    let mut passes = Vec::new();
    let mut dirty: Vec<PageAddr> = source.addresses().collect();
    for generation in 0..=DIRTY_PERCENT.len() as u32 {
        let last = generation as usize == DIRTY_PERCENT.len();
        let label = if generation == 0 {
            "pass 0: all memory".to_string()
        } else if last {
            format!("pass {generation}: stop and copy")
        } else {
            format!("pass {generation}: dirty pages")
        };
        let stats = run_pass(
            &mut migration,
            &source,
            &mut dest,
            &dirty,
            generation,
            last,
            &label,
        )?;
        passes.push((label, stats));
        if !last {
            dirty = guest_writes(&mut source, &mut rng, DIRTY_PERCENT[generation as usize]);
        }
    }

    let spinner = progress::spinner("comparing destination memory with the source");
    let identical = dest == source;
    spinner.finish_and_clear();
    print_report(&passes, size);
    if !identical {
        bail!("destination memory differs from the source: the migration is WRONG");
    }
    println!(
        "\nverified: all {} destination pages are identical to the source",
        size.div_ceil(PAGE_SIZE as u64)
    );
    Ok(())
}

fn run_pass(
    migration: &mut Migration,
    source: &MemoryImage,
    dest: &mut MemoryImage,
    pages: &[PageAddr],
    generation: u32,
    finish: bool,
    label: &str,
) -> Result<PassStats> {
    let total = pages.len() as u64 * PAGE_SIZE as u64;
    let bar = progress::bytes_bar(total, label);
    let done = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        let worker = scope.spawn(|| migration.pass(source, dest, pages, generation, finish, &done));
        while !worker.is_finished() {
            bar.set_position(done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(50));
        }
        worker.join()
    });
    bar.set_position(done.load(Ordering::Relaxed));
    bar.finish();
    match result {
        Ok(stats) => stats,
        Err(_) => bail!("the migration pass panicked"),
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

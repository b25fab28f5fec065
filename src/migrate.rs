//! An in-process page migration for the demo: one encoder thread and one decoder thread per
//! codec stream, joined by a bounded queue of frames, so encoding, "sending" and applying overlap
//! as they will over a real link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use pagecodec::{
    ClassCounts, Decoder, DecoderLimits, Encoder, EncoderConfig, Generation, MemoryImage, PageAddr,
    ShardMap,
};

/// Frames in flight per stream: bounds memory, and makes a slow decoder slow the encoder down.
const FRAMES_IN_FLIGHT: usize = 8;

/// What one pass moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassStats {
    pub pages: u64,
    pub wire_bytes: u64,
    pub classes: ClassCounts,
    pub elapsed: Duration,
}

/// Source-side encoders and destination-side decoders of every stream.
pub struct Migration {
    map: ShardMap,
    encoders: Vec<Encoder>,
    decoders: Vec<Decoder>,
    /// Start frames, produced before any pass.
    pending: Vec<Vec<Vec<u8>>>,
}

impl Migration {
    pub fn new(source: &MemoryImage, streams: u32, digest_seed: u64) -> Result<Self> {
        let map = ShardMap::new(streams)?;
        let per_stream = |bytes: u64| bytes / u64::from(streams);
        let mut encoders = Vec::new();
        let mut pending = Vec::new();
        for id in 0..streams {
            let mut config = EncoderConfig::new(id, source.layout().clone());
            config.dup_cache_bytes = per_stream(config.dup_cache_bytes);
            config.delta_cache_bytes = per_stream(config.delta_cache_bytes);
            config.digest_seed = digest_seed ^ u64::from(id);
            let mut encoder = Encoder::new(config)?;
            pending.push(std::iter::from_fn(|| encoder.pop_frame()).collect());
            encoders.push(encoder);
        }
        let decoders = (0..streams)
            .map(|id| {
                Decoder::new(DecoderLimits {
                    stream_id: Some(id),
                    ..DecoderLimits::default()
                })
            })
            .collect();
        Ok(Self {
            map,
            encoders,
            decoders,
            pending,
        })
    }

    /// Sends `pages` of `source` as generation `generation` and applies them to `dest`.
    /// `done` counts the bytes encoded, for progress display. `finish` also ends the streams.
    pub fn pass(
        &mut self,
        source: &MemoryImage,
        dest: &mut MemoryImage,
        pages: &[PageAddr],
        generation: Generation,
        finish: bool,
        done: &AtomicU64,
    ) -> Result<PassStats> {
        let mut shards = vec![Vec::new(); self.map.shards() as usize];
        for &addr in pages {
            shards[self.map.shard_of(addr) as usize].push(addr);
        }
        let before: Vec<_> = self.encoders.iter().map(|e| *e.stats()).collect();
        let start = Instant::now();
        let writers = dest.shard_writers(self.map);
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for (id, ((((encoder, decoder), mut writer), shard), pending)) in self
                .encoders
                .iter_mut()
                .zip(&mut self.decoders)
                .zip(writers)
                .zip(&shards)
                .zip(&mut self.pending)
                .enumerate()
            {
                let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(FRAMES_IN_FLIGHT);
                let initial = std::mem::take(pending);
                handles.push(scope.spawn(move || -> Result<()> {
                    for frame in initial {
                        tx.send(frame).map_err(|_| anyhow!("decoder stopped"))?;
                    }
                    for &addr in shard {
                        let page = source.page(addr).context("page outside the source image")?;
                        encoder.encode(addr, generation, page)?;
                        while let Some(frame) = encoder.pop_frame() {
                            tx.send(frame).map_err(|_| anyhow!("decoder stopped"))?;
                        }
                        done.fetch_add(page.len() as u64, Ordering::Relaxed);
                    }
                    if finish {
                        encoder.finish()?;
                    } else {
                        encoder.flush();
                    }
                    while let Some(frame) = encoder.pop_frame() {
                        tx.send(frame).map_err(|_| anyhow!("decoder stopped"))?;
                    }
                    Ok(())
                }));
                handles.push(scope.spawn(move || -> Result<()> {
                    for frame in rx {
                        decoder
                            .decode(&frame, &mut writer)
                            .with_context(|| format!("decoding stream {id}"))?;
                    }
                    Ok(())
                }));
            }
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("a migration thread panicked")))
                })
                .collect()
        });
        for result in results {
            result?;
        }
        let mut stats = PassStats {
            pages: pages.len() as u64,
            elapsed: start.elapsed(),
            ..PassStats::default()
        };
        for (encoder, before) in self.encoders.iter().zip(before) {
            let now = encoder.stats();
            stats.wire_bytes += now.wire_bytes - before.wire_bytes;
            for class in pagecodec::PageClass::ALL {
                stats.classes.add(
                    class,
                    now.classes.pages(class) - before.classes.pages(class),
                    now.classes.wire_bytes(class) - before.classes.wire_bytes(class),
                );
            }
        }
        if finish && !self.decoders.iter().all(Decoder::is_complete) {
            bail!("a stream ended without its End frame being decoded");
        }
        Ok(stats)
    }
}

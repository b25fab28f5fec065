//! Counters of a session, cheap to update from channel threads and to snapshot from anywhere.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagecodec::ClassCounts;

/// How often the throughput history takes a sample.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct ChannelCounters {
    frames: AtomicU64,
    wire_bytes: AtomicU64,
    pages: AtomicU64,
    compression_level: AtomicU64,
}

/// One channel's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Frames sent or received.
    pub frames: u64,
    /// Bytes of those frames.
    pub wire_bytes: u64,
    /// Pages they carried.
    pub pages: u64,
    /// The encoder's compression level (source side): 0 to 100, the percentage of page groups
    /// compressed with LZ4; 101 to 200, all of them compressed and `level - 100` percent of
    /// those with zstd instead.
    pub compression_level: u64,
}

/// Throughput history point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Time since the session's data started flowing.
    pub at: Duration,
    /// Page bytes so far.
    pub raw_bytes: u64,
    /// Frame bytes so far.
    pub wire_bytes: u64,
}

/// A consistent-enough copy of the counters.
#[derive(Clone, Debug, Default)]
pub struct StatsSnapshot {
    /// Time since the session's data started flowing.
    pub elapsed: Duration,
    /// Per channel.
    pub channels: Vec<ChannelStats>,
    /// Pages by class, as far as reported.
    pub classes: ClassCounts,
}

impl StatsSnapshot {
    /// Pages over all channels.
    pub fn pages(&self) -> u64 {
        self.channels.iter().map(|c| c.pages).sum()
    }

    /// Page bytes over all channels.
    pub fn raw_bytes(&self) -> u64 {
        self.pages() * pagecodec::PAGE_SIZE as u64
    }

    /// Frame bytes over all channels.
    pub fn wire_bytes(&self) -> u64 {
        self.channels.iter().map(|c| c.wire_bytes).sum()
    }

    /// Frames over all channels.
    pub fn frames(&self) -> u64 {
        self.channels.iter().map(|c| c.frames).sum()
    }
}

/// Counters shared by the threads of one end of a session.
#[derive(Debug)]
pub struct SessionStats {
    start: Instant,
    channels: Vec<ChannelCounters>,
    classes: Vec<Mutex<ClassCounts>>,
    history: Mutex<Vec<Sample>>,
}

impl SessionStats {
    /// Counters for `channels` channels, the clock starting now.
    pub fn new(channels: usize) -> Self {
        Self {
            start: Instant::now(),
            channels: (0..channels).map(|_| ChannelCounters::default()).collect(),
            classes: (0..channels)
                .map(|_| Mutex::new(ClassCounts::default()))
                .collect(),
            history: Mutex::new(Vec::new()),
        }
    }

    /// Counts one frame of `bytes` on `channel`.
    pub fn frame(&self, channel: usize, bytes: usize) {
        let c = &self.channels[channel];
        c.frames.fetch_add(1, Ordering::Relaxed);
        c.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `pages` pages on `channel`.
    pub fn pages(&self, channel: usize, pages: u64) {
        self.channels[channel]
            .pages
            .fetch_add(pages, Ordering::Relaxed);
        self.maybe_sample();
    }

    /// Replaces `channel`'s pages-by-class totals.
    pub fn set_classes(&self, channel: usize, classes: ClassCounts) {
        *self.classes[channel].lock().expect("not poisoned") = classes;
    }

    /// Records the compression level a channel's encoder uses.
    pub fn set_compression_level(&self, channel: usize, level: u32) {
        self.channels[channel]
            .compression_level
            .store(u64::from(level), Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut classes = ClassCounts::default();
        for c in &self.classes {
            classes.merge(&c.lock().expect("not poisoned"));
        }
        StatsSnapshot {
            elapsed: self.start.elapsed(),
            channels: self
                .channels
                .iter()
                .map(|c| ChannelStats {
                    frames: c.frames.load(Ordering::Relaxed),
                    wire_bytes: c.wire_bytes.load(Ordering::Relaxed),
                    pages: c.pages.load(Ordering::Relaxed),
                    compression_level: c.compression_level.load(Ordering::Relaxed),
                })
                .collect(),
            classes,
        }
    }

    /// The throughput history so far.
    pub fn history(&self) -> Vec<Sample> {
        self.history.lock().expect("not poisoned").clone()
    }

    /// Adds a history sample if the last one is older than [`SAMPLE_INTERVAL`]. Cheap enough to
    /// call for every batch; never blocks on a busy lock.
    fn maybe_sample(&self) {
        let Ok(mut history) = self.history.try_lock() else {
            return;
        };
        let at = self.start.elapsed();
        if history.last().is_some_and(|s| at - s.at < SAMPLE_INTERVAL) {
            return;
        }
        let (mut raw_bytes, mut wire_bytes) = (0, 0);
        for c in &self.channels {
            raw_bytes += c.pages.load(Ordering::Relaxed) * pagecodec::PAGE_SIZE as u64;
            wire_bytes += c.wire_bytes.load(Ordering::Relaxed);
        }
        history.push(Sample {
            at,
            raw_bytes,
            wire_bytes,
        });
    }
}

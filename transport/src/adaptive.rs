//! Adaptive compression: how a channel's worker reads its link from each short window (blocked
//! on it, or bytes waiting to get on it), and moves its encoder's compression level so that
//! compression runs only while the link, not the CPU, is the bottleneck (`DESIGN.md`,
//! "Adaptive compression").

use std::time::{Duration, Instant};

use pagecodec::{Encoder, EncoderStats, PAGE_SIZE};

use crate::channel::Backlog;
use crate::sender::MAX_COMPRESSION_LEVEL;

/// Sets an encoder to compression `level` (see [`Compression::Fixed`](crate::Compression::Fixed)).
/// A worker measuring its compressor's pace (`probe`) still compresses [`PROBE_SHARE`] of its
/// groups at level 0.
pub(crate) fn apply_level(encoder: &mut Encoder, level: u32, probe: bool) {
    let lz4 = if level == 0 && probe {
        PROBE_SHARE
    } else {
        level.min(100)
    };
    encoder.set_lz4_share(lz4);
    encoder.set_zstd_share(level.saturating_sub(100));
    // At no compression, caching content for duplicates costs more than it saves: stop copying
    // pages into the cache.
    encoder.set_dup_admission(level > 0);
}

/// Decoder busy share (thousandths) above which the destination, not the link, holds us back.
const RECEIVER_BUSY: u32 = 600;

/// Step of the compression level.
const LEVEL_STEP: u32 = 25;

/// Time per decision. A worker runs in bursts (a batch queue drained in a millisecond, then a
/// wait for the link or for the caller), so a window must span several of them to measure the
/// share of time blocked rather than one burst's phase.
pub(crate) const WINDOW: Duration = Duration::from_millis(20);

/// Share of a window (thousandths) the worker spent waiting for the link above which the link
/// is the bottleneck.
const LINK_BOUND: u32 = 250;

/// Share above which the link is saturated: compression goes up faster.
const LINK_SATURATED: u32 = 500;

/// Share below which the link waits for this worker (or the worker for its caller).
const LINK_IDLE: u32 = 50;

/// Receiver busy share before the destination's first feedback. Until then a full link proves
/// nothing (the destination may still be starting its decoders), so compression does not go up.
pub(crate) const NO_FEEDBACK: u32 = u32::MAX;

/// What a window showed of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// The link takes bytes much slower than this worker makes them.
    Saturated,
    /// The link takes bytes slower than this worker makes them.
    Full,
    /// The link waits for this worker (or the worker for its caller).
    Waiting,
    /// Neither clearly.
    Unclear,
}

/// Reads the link's state from a window: the share of it the worker spent blocked on the link
/// (submitting frames to a full writer queue, or flushing it), and the backlog at its end.
///
/// The link is full when bytes wait to get on it: a deep backlog not yet sent (in the writer's
/// queue or unsent in the kernel's socket) shows it where the worker is starved of CPU (both ends
/// and the VMM on a few cores), so it is seldom blocked, yet what it made waits; blocking shows
/// it where the buffers are small, so the queue fills at once. For a kernel socket, either
/// counts only while the kernel holds unsent bytes: a worker also waits on its sends, and its
/// queue also grows, when the CPUs that would process them are busy, with the link idle and the
/// kernel having sent all it was given. Bytes in flight (sent, not yet acknowledged) never show
/// a full link, for the same reason: a busy receiver acknowledges late on a fast link. They do
/// show that the link is still busy, so the link waits for this worker only when little is
/// unsent or in flight.
pub(crate) fn link_state(
    blocked_permille: u32,
    backlog: Backlog,
    backlog_full: usize,
) -> LinkState {
    // A socket whose kernel has sent everything it was given is not waiting for its link.
    let (blocked_on_link, unsent) = if backlog.kernel_unsent.is_none_or(|unsent| unsent > 0) {
        (blocked_permille, backlog.unsent())
    } else {
        (0, 0)
    };
    if blocked_on_link > LINK_SATURATED || unsent >= 2 * backlog_full {
        LinkState::Saturated
    } else if blocked_on_link > LINK_BOUND || unsent >= backlog_full {
        LinkState::Full
    } else if blocked_on_link < LINK_IDLE && backlog.total() < backlog_full / 4 {
        LinkState::Waiting
    } else {
        LinkState::Unclear
    }
}

/// The compression level for the next window.
///
/// Compression pays only while the link is the bottleneck. Where the bottleneck is shows in three
/// measurements: the state of the link over the last window (see [`link_state`]), the busy
/// share of the destination's decoder for this channel, which it reports every 50 ms, and
/// whether the compressor runs well ahead of the link at all (`compression_pays`, see
/// [`compression_can_pay`]; when it does not, the level goes down whatever the link shows). A full
/// link with an idle decoder: compress more. A link that waits for this worker: compress less.
/// A busy decoder means the destination's CPU is the limit, and raw pages cost it less than
/// compressed ones: compress less. Past 100 the level swaps LZ4 for zstd, group by group: a
/// link that stays full with every group LZ4-compressed is slower than zstd too. The level
/// settles where compressing takes about as long as sending, which keeps the link full with
/// the fewest bytes.
///
/// Up is quicker than down: a saturated link raises the level two steps at once, while one
/// window in which the link waited is not enough to lower it (the caller may have paused for a
/// moment, as QEMU does between the sections of its stream); two in a row are. Every window
/// spent below the level a slow link needs sends more bytes than it had to.
pub(crate) fn next_level(
    level: u32,
    link: LinkState,
    previous: LinkState,
    receiver_busy: u32,
    compression_pays: bool,
) -> u32 {
    let destination_busy = receiver_busy >= RECEIVER_BUSY && receiver_busy != NO_FEEDBACK;
    let up = |steps: u32| (level + steps * LEVEL_STEP).min(MAX_COMPRESSION_LEVEL);
    match link {
        _ if destination_busy || !compression_pays => level.saturating_sub(LEVEL_STEP),
        LinkState::Waiting if previous == LinkState::Waiting => level.saturating_sub(LEVEL_STEP),
        _ if receiver_busy == NO_FEEDBACK => level,
        LinkState::Saturated => up(2),
        LinkState::Full => up(1),
        _ => level,
    }
}

/// Time a worker spent blocked on the link over its current window.
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) started: Instant,
    pub(crate) blocked: Duration,
    /// Frame bytes handed to the link.
    pub(crate) wire: u64,
}

impl Window {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            blocked: Duration::ZERO,
            wire: 0,
        }
    }

    /// Frame bytes the link took per second over this window.
    pub(crate) fn link_rate(&self, wall: Duration) -> f64 {
        self.wire as f64 / wall.as_secs_f64().max(1e-9)
    }
}

/// The pace of a worker's compressor, measured from the encoder's totals
/// (`EncoderStats::compressed_input`, `EncoderStats::compress_nanos`) whenever it has
/// compressed enough since the last measurement. At level 0 the adaptive worker still
/// compresses a few groups ([`PROBE_SHARE`]) so that the pace is known before the level ever
/// goes up: on a link faster than any compressor, it never does.
#[derive(Debug, Default)]
pub(crate) struct CompressPace {
    /// Totals at the last measurement.
    input: u64,
    nanos: u64,
    /// Page bytes per second, once measured, and when.
    rate: Option<f64>,
    measured_at: Option<Instant>,
}

impl CompressPace {
    /// Whether the pace needs measuring: never measured, or not for [`PACE_MAX_AGE`].
    pub(crate) fn is_stale(&self) -> bool {
        self.measured_at
            .is_none_or(|at| at.elapsed() > PACE_MAX_AGE)
    }

    /// Takes a new measurement if the encoder compressed enough since the last one; returns
    /// the latest pace.
    pub(crate) fn update(&mut self, encoder: &EncoderStats) -> Option<f64> {
        let input = encoder.compressed_input - self.input;
        let nanos = encoder.compress_nanos - self.nanos;
        if input >= MIN_COMPRESS_SAMPLE && nanos > 0 {
            self.rate = Some(input as f64 * 1e9 / nanos as f64);
            self.measured_at = Some(Instant::now());
            self.input = encoder.compressed_input;
            self.nanos = encoder.compress_nanos;
        }
        self.rate
    }
}

/// Share of page groups (percent) an adaptive worker compresses with LZ4 at level 0 while it
/// measures its compressor's pace: 2 groups in 100 cost about 2% of the time LZ4 would take on
/// all of them.
const PROBE_SHARE: u32 = 2;

/// How long a measured compressor pace holds before a worker at level 0 measures it again (the
/// content, and the CPU the worker gets, change over a migration).
const PACE_MAX_AGE: Duration = Duration::from_secs(1);

/// Page bytes compressed between two measurements of the compressor's pace: a few groups.
const MIN_COMPRESS_SAMPLE: u64 = 4 * 16 * PAGE_SIZE as u64;

/// How much faster than the link drains the compressor must run for compression to pay.
const COMPRESS_MARGIN: f64 = 2.0;

/// Whether compression can pay on a link that drains `link_rate` bytes per second, for a
/// compressor measured at `compress_rate` page bytes per second (`None`: never measured, and
/// only trying tells).
///
/// Compressing trades the worker's CPU for link time. It helps while the link is the
/// bottleneck by a margin: a compressor that cannot feed the link twice over makes itself the
/// bottleneck, and on a machine where both ends share the CPUs it also takes them from the
/// kernel's copies and the destination's decoders. Blocking and backlog alone cannot tell this:
/// on a machine short of CPU both show on loopback too, where the "link" is a memory copy
/// faster than any compressor.
pub(crate) fn compression_can_pay(link_rate: f64, compress_rate: Option<f64>) -> bool {
    compress_rate.is_none_or(|rate| link_rate * COMPRESS_MARGIN < rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_follows_the_bottleneck() {
        use LinkState::*;
        // Link full, destination idle: compress more, past LZ4 on to zstd, up to all of it;
        // two steps at once when the link is saturated.
        assert_eq!(next_level(50, Full, Unclear, 100, true), 75);
        assert_eq!(next_level(50, Saturated, Unclear, 100, true), 100);
        assert_eq!(next_level(100, Full, Full, 100, true), 125);
        assert_eq!(next_level(200, Saturated, Full, 100, true), 200);
        // The link waits for us: compress less, from the second such window on.
        assert_eq!(next_level(150, Waiting, Full, 100, true), 150);
        assert_eq!(next_level(150, Waiting, Waiting, 100, true), 125);
        assert_eq!(next_level(0, Waiting, Waiting, 0, true), 0);
        // Link full, but the destination is busy decoding: compress less, at once.
        assert_eq!(next_level(50, Full, Full, 900, true), 25);
        // Link full, but the compressor cannot keep well ahead of it: compress less, at once,
        // and never go up from raw.
        assert_eq!(next_level(50, Saturated, Full, 100, false), 25);
        assert_eq!(next_level(0, Saturated, Saturated, 100, false), 0);
        // Link full before the destination said anything: hold, never raise.
        assert_eq!(next_level(50, Saturated, Full, NO_FEEDBACK, true), 50);
        // In between: hold.
        assert_eq!(next_level(50, Unclear, Waiting, 100, true), 50);
    }

    #[test]
    fn compression_pays_only_on_links_much_slower_than_the_compressor() {
        // Never measured: only trying tells.
        assert!(compression_can_pay(1e9, None));
        // A 1 Gbit/s link shared by two channels, LZ4 at 800 MB/s, zstd at 250 MB/s: pays.
        assert!(compression_can_pay(62e6, Some(800e6)));
        assert!(compression_can_pay(62e6, Some(250e6)));
        // Loopback draining 1.2 GB/s per channel: no compressor keeps up.
        assert!(!compression_can_pay(1.2e9, Some(800e6)));
        // Less than twice as fast as the link: the compressor would be the bottleneck.
        assert!(!compression_can_pay(500e6, Some(800e6)));
    }

    #[test]
    fn the_compressor_pace_is_measured_once_it_compressed_enough() {
        let mut pace = CompressPace::default();
        let mut stats = EncoderStats {
            compressed_input: MIN_COMPRESS_SAMPLE / 2,
            compress_nanos: 1_000,
            ..EncoderStats::default()
        };
        assert_eq!(pace.update(&stats), None);
        stats.compressed_input = 8_000_000;
        stats.compress_nanos = 10_000_000;
        let rate = pace.update(&stats).expect("enough compressed");
        assert!((rate - 800e6).abs() < 1.0, "{rate}");
        // Too little since then: the last pace holds.
        stats.compressed_input += MIN_COMPRESS_SAMPLE / 2;
        stats.compress_nanos += 1;
        assert_eq!(pace.update(&stats), Some(rate));
        // Enough again: the new pace (4 MB in 20 ms) replaces it.
        stats.compressed_input = 12_000_000;
        stats.compress_nanos = 30_000_000;
        let slower = pace.update(&stats).expect("measured");
        assert!((slower - 200e6).abs() < 1e6, "{slower}");
    }

    #[test]
    fn a_full_link_shows_in_blocking_or_in_the_backlog() {
        let full = 1 << 20;
        let socket = |queued: usize, unsent: usize, in_flight: usize| Backlog {
            queued,
            kernel_unsent: Some(unsent),
            in_flight,
        };
        // Blocked most of the window, little queued (small buffers), the socket holding some.
        assert_eq!(
            link_state(300, socket(0, 100 << 10, 0), full),
            LinkState::Full
        );
        assert_eq!(
            link_state(600, socket(0, 100 << 10, 0), full),
            LinkState::Saturated
        );
        // Hardly blocked, but a deep backlog not yet sent (a worker short of CPU).
        assert_eq!(
            link_state(5, socket(512 << 10, 512 << 10, 0), full),
            LinkState::Full
        );
        assert_eq!(
            link_state(5, socket(1 << 20, 1 << 20, 0), full),
            LinkState::Saturated
        );
        // Neither blocked nor queued nor in flight: the link waits.
        assert_eq!(
            link_state(10, socket(64 << 10, 0, 0), full),
            LinkState::Waiting
        );
        // Some of each: unclear.
        assert_eq!(
            link_state(100, socket(256 << 10, 256 << 10, 0), full),
            LinkState::Unclear
        );
    }

    #[test]
    fn late_acknowledgements_do_not_look_like_a_full_link() {
        let full = 1 << 20;
        // Blocked on sends, with a queue, while the kernel has sent everything, and megabytes
        // unacknowledged: CPUs too busy to send or to acknowledge, not a full link. Nor does
        // the link wait: it holds its level.
        let busy_peer = Backlog {
            queued: 2 << 20,
            kernel_unsent: Some(0),
            in_flight: 2 << 20,
        };
        assert_eq!(link_state(800, busy_peer, full), LinkState::Unclear);
        // Once nothing is in flight either, the link waits, however long the sends took.
        let idle_link = Backlog {
            queued: 64 << 10,
            in_flight: 0,
            ..busy_peer
        };
        assert_eq!(link_state(800, idle_link, full), LinkState::Waiting);
        // The same with the kernel holding unsent bytes: the link is full.
        let full_link = Backlog {
            kernel_unsent: Some(4 << 10),
            ..busy_peer
        };
        assert_eq!(link_state(800, full_link, full), LinkState::Saturated);
        // Without a kernel socket (in-process channels), blocking is all there is to go by.
        let in_process = Backlog {
            queued: 64 << 10,
            kernel_unsent: None,
            in_flight: 0,
        };
        assert_eq!(link_state(800, in_process, full), LinkState::Saturated);
        assert_eq!(link_state(10, in_process, full), LinkState::Waiting);
    }

    #[test]
    fn levels_set_both_shares() {
        let layout = pagecodec::MemoryLayout::new(vec![16]).unwrap();
        let mut encoder = Encoder::new(pagecodec::EncoderConfig::new(0, layout)).unwrap();
        for (level, lz4, zstd) in [
            (0, 0, 0),
            (60, 60, 0),
            (100, 100, 0),
            (150, 100, 50),
            (200, 100, 100),
        ] {
            apply_level(&mut encoder, level, false);
            assert_eq!(
                (encoder.lz4_share(), encoder.zstd_share()),
                (lz4, zstd),
                "level {level}"
            );
        }
        // An adaptive worker at level 0 keeps measuring its compressor on a few groups.
        apply_level(&mut encoder, 0, true);
        assert_eq!(
            (encoder.lz4_share(), encoder.zstd_share()),
            (PROBE_SHARE, 0)
        );
        apply_level(&mut encoder, 50, true);
        assert_eq!((encoder.lz4_share(), encoder.zstd_share()), (50, 0));
    }
}

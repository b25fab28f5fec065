//! The calling thread's CPU clock, for timing work that shares its CPUs.
//!
//! A compressor's pace tells its caller whether compressing can keep up with a link (see
//! `EncoderStats::compress_nanos`). Timed with a wall clock, that pace also counts the time the
//! thread waited for a CPU while it compressed: on a machine whose CPUs are all busy (two VMs
//! and two shims on two CPUs) one preempted group made LZ4 look 7 times slower than it is, and
//! the transport stopped compressing while its link stayed full. The thread's CPU clock counts
//! only the time the thread ran.

/// A reading of the calling thread's CPU clock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuInstant(u64);

impl CpuInstant {
    /// Now, on the calling thread's CPU clock.
    pub(crate) fn now() -> Self {
        Self(thread_cpu_nanos())
    }

    /// CPU nanoseconds the calling thread ran since `self` (read on the same thread).
    pub(crate) fn elapsed_nanos(self) -> u64 {
        thread_cpu_nanos().saturating_sub(self.0)
    }
}

/// The calling thread's CPU time, nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports
    // since 2.6.12. On the impossible failure `ts` stays zero, which reads as no time spent.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_sleeping_thread_spends_no_cpu_time() {
        let start = CpuInstant::now();
        std::thread::sleep(Duration::from_millis(50));
        let slept = start.elapsed_nanos();
        assert!(
            slept < 20_000_000,
            "sleeping 50 ms counted {slept} ns of CPU"
        );
    }

    #[test]
    fn a_busy_thread_counts_its_cpu_time_and_never_more_than_the_wall_clock() {
        let start = CpuInstant::now();
        let wall = Instant::now();
        let mut x = 0u64;
        let mut cpu = 0;
        while cpu < 5_000_000 && wall.elapsed() < Duration::from_secs(10) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            cpu = start.elapsed_nanos();
        }
        let wall = wall.elapsed().as_nanos() as u64;
        assert!(cpu >= 5_000_000, "10 s of spinning counted {cpu} ns of CPU");
        // One thread cannot run longer than the time that passed (1 ms for the clocks' reads).
        assert!(
            cpu <= wall + 1_000_000,
            "{cpu} ns of CPU in {wall} ns of wall time"
        );
    }
}

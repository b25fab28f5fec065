//! What the process running a shim costs its host: CPU time and resident memory, for the
//! migration summary.
//!
//! Operators weigh a shim's speed against what it takes from hosts that also run VMs. The
//! figures are the whole process's (a shim process carries one migration at a time; a program
//! that links the library gets its own figures with them). Nothing here changes process-wide
//! state: the peak is the process's since it started (`VmHWM`), never reset, since resetting it
//! (`/proc/self/clear_refs`) would also reset it for whatever else reads it.

use std::time::Duration;

/// The process's CPU time so far, user and system, over all its threads
/// (`CLOCK_PROCESS_CPUTIME_ID`). `None` where the clock cannot be read.
pub(crate) fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec, and the clock id a constant Linux has
    // supported since 2.6.12.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// The most memory the process has held resident since it started, bytes (`VmHWM` in
/// `/proc/self/status`). `None` where that cannot be read.
pub(crate) fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    peak_resident_in(&status)
}

/// `VmHWM` of a `/proc/PID/status` text, bytes.
fn peak_resident_in(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut words = line["VmHWM:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib.checked_mul(1024)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_read_from_the_status_text() {
        let status =
            "Name:\tpagestream\nVmPeak:\t  900000 kB\nVmHWM:\t  183236 kB\nVmRSS:\t  100 kB\n";
        assert_eq!(peak_resident_in(status), Some(183_236 * 1024));
        assert_eq!(peak_resident_in("Name:\tx\nVmRSS:\t 5 kB\n"), None);
        assert_eq!(peak_resident_in("VmHWM:\t 5 MB\n"), None);
        assert_eq!(peak_resident_in("VmHWM:\t lots kB\n"), None);
    }

    #[test]
    fn this_process_has_a_peak_and_spends_cpu_time() {
        let peak = peak_resident_bytes().expect("Linux has /proc/self/status");
        // A test binary holds at least its code resident.
        assert!(peak > 1 << 20, "peak {peak} bytes");
        let start = process_cpu_time().expect("the process clock reads");
        let mut x = 0u64;
        let busy_until = std::time::Instant::now() + Duration::from_millis(30);
        while std::time::Instant::now() < busy_until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = process_cpu_time().unwrap().saturating_sub(start);
        assert!(
            spent >= Duration::from_millis(10),
            "30 ms of spinning counted {spent:?}"
        );
    }
}

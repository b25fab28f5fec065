//! A one-line description of the machine, printed beside every figure.

/// CPU model, logical CPUs and kernel release of this machine.
pub fn describe() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown kernel".into());
    format!("{cpu}, {cpus} CPUs, Linux {kernel}")
}

/// The whole machine's CPU time so far, by kind, in clock ticks (`/proc/stat`'s `cpu` line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Running anything: user (guests included), nice, system, interrupts.
    pub busy: u64,
    /// Idle, or idle waiting for I/O.
    pub idle: u64,
    /// Taken by the hypervisor for something else while this machine wanted to run.
    pub steal: u64,
}

/// CPU seconds of each kind the machine spent between two readings of [`CpuTimes`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CpuUse {
    /// Seconds of CPU time spent running anything, summed over the CPUs.
    pub busy_s: f64,
    /// Seconds of CPU time left idle.
    pub idle_s: f64,
    /// Seconds of CPU time the hypervisor took.
    pub steal_s: f64,
}

impl CpuTimes {
    /// The machine's CPU times now.
    pub fn read() -> Result<CpuTimes, String> {
        let text = std::fs::read_to_string("/proc/stat")
            .map_err(|e| format!("cannot read /proc/stat: {e}"))?;
        Self::parse(&text).ok_or_else(|| "/proc/stat has no readable `cpu` line".to_string())
    }

    /// The `cpu` line of `/proc/stat`'s text: user nice system idle iowait irq softirq steal
    /// (guest time is counted in user already).
    pub fn parse(proc_stat: &str) -> Option<CpuTimes> {
        let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        if v.len() < 4 {
            return None;
        }
        Some(CpuTimes {
            busy: field(0) + field(1) + field(2) + field(5) + field(6),
            idle: field(3) + field(4),
            steal: field(7),
        })
    }

    /// What the machine spent since `earlier`, at `ticks_per_s` clock ticks per second.
    pub fn since(&self, earlier: &CpuTimes, ticks_per_s: f64) -> CpuUse {
        let s = |now: u64, then: u64| now.saturating_sub(then) as f64 / ticks_per_s;
        CpuUse {
            busy_s: s(self.busy, earlier.busy),
            idle_s: s(self.idle, earlier.idle),
            steal_s: s(self.steal, earlier.steal),
        }
    }
}

/// CPU seconds (user and system) process `pid` has used so far, from `/proc/PID/stat`.
pub fn process_cpu_s(pid: u32) -> Result<f64, String> {
    Ok(task_cpu_ticks(&format!("/proc/{pid}/stat"))? as f64 / clock_ticks_per_s())
}

/// CPU time (user and system) of the process or thread whose `stat` file `path` is
/// (`/proc/PID/stat`, `/proc/self/task/TID/stat`), in clock ticks.
pub fn task_cpu_ticks(path: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    process_ticks(&text).ok_or_else(|| format!("{path} has no readable CPU times"))
}

/// utime + stime of a `/proc/PID/stat` line, in clock ticks: fields 14 and 15, counted after
/// the command name in parentheses (which may hold spaces and parentheses itself).
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: utime and stime are the 12th and 13th.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc/stat` (`USER_HZ`).
pub fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_by_kind_and_subtracted() {
        let before = "cpu  100 5 50 1000 20 3 2 7 40 0\ncpu0 50 2 25 500 10 1 1 3 20 0\nintr 1\n";
        let after = "cpu  300 5 150 1100 30 5 4 17 90 0\ncpu0 1 1 1 1 1 1 1 1 1 1\n";
        let a = CpuTimes::parse(before).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 100 + 5 + 50 + 3 + 2,
                idle: 1020,
                steal: 7
            }
        );
        let b = CpuTimes::parse(after).unwrap();
        let used = b.since(&a, 100.0);
        assert_eq!(
            used,
            CpuUse {
                busy_s: 3.04,
                idle_s: 1.1,
                steal_s: 0.1
            }
        );
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2\n"), None);
    }

    #[test]
    fn a_process_cpu_time_is_read_past_an_odd_name() {
        let stat = "4242 (qemu (x) 1) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 3 0 99 1000 50";
        assert_eq!(process_ticks(stat), Some(175));
        assert_eq!(process_ticks("4242 (cut) S 1 2"), None);
        assert_eq!(process_ticks("no name here"), None);
        // This process, busy until its CPU time moves on by at least a clock tick.
        let me = std::process::id();
        let start = process_cpu_s(me).unwrap();
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_s(me).unwrap() <= start && wall.elapsed().as_secs() < 10 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        assert!(
            process_cpu_s(me).unwrap() > start,
            "10 s of spinning counted no CPU time"
        );
    }

    #[test]
    fn this_machine_reports_cpu_time() {
        let t = CpuTimes::read().unwrap();
        assert!(t.busy + t.idle > 0);
        assert!(clock_ticks_per_s() > 0.0);
    }
}

//! Running the test guest under QEMU: for the tests and benchmarks that migrate real VMs.
//!
//! The guest is built by `scripts/build-guest.sh` (Debian's kernel, a busybox initramfs, a
//! workload that fills memory and keeps dirtying it). QEMU runs it with TCG, a QMP socket and
//! the serial console in a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::{Qmp, QmpError};

/// The kernel and initramfs of the test guest.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs with busybox and the workload.
    pub initrd: PathBuf,
}

impl Guest {
    /// The guest built by `scripts/build-guest.sh` under `root` (the workspace), with a message
    /// saying how to build it if it is missing.
    pub fn locate(root: &Path) -> Result<Self, String> {
        let dir = root.join("target/guest");
        let guest = Guest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.gz"),
        };
        for file in [&guest.kernel, &guest.initrd] {
            if !file.is_file() {
                return Err(format!(
                    "{} is missing: run scripts/build-guest.sh first",
                    file.display()
                ));
            }
        }
        Ok(guest)
    }
}

/// Which QEMU runs a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QemuBuild {
    /// The system's `qemu-system-x86_64` (Debian 12's QEMU 7.2 in the tests).
    #[default]
    System,
    /// A QEMU unpacked under this root (`usr/bin`, `usr/share/qemu`, `usr/share/seabios`,
    /// `usr/lib/x86_64-linux-gnu/qemu`), such as the QEMU 10 of `scripts/install-qemu10.sh`.
    Unpacked(PathBuf),
}

impl QemuBuild {
    /// The QEMU 10 that `scripts/install-qemu10.sh` unpacked under `root` (the workspace), with
    /// a message saying how to get it if it is missing.
    pub fn qemu10(root: &Path) -> Result<Self, String> {
        let dir = root.join("target/qemu10/root");
        let build = QemuBuild::Unpacked(dir);
        if !build.program().is_file() {
            return Err(format!(
                "{} is missing: run scripts/install-qemu10.sh first",
                build.program().display()
            ));
        }
        Ok(build)
    }

    /// The emulator's binary.
    pub fn program(&self) -> PathBuf {
        match self {
            QemuBuild::System => PathBuf::from("qemu-system-x86_64"),
            QemuBuild::Unpacked(root) => root.join("usr/bin/qemu-system-x86_64"),
        }
    }

    /// Sets up `cmd`, which runs [`QemuBuild::program`], to find this build's firmware and
    /// modules rather than the system's.
    fn configure(&self, cmd: &mut Command) {
        if let QemuBuild::Unpacked(root) = self {
            cmd.arg("-L")
                .arg(root.join("usr/share/qemu"))
                .arg("-L")
                .arg(root.join("usr/share/seabios"))
                .env(
                    "QEMU_MODULE_DIR",
                    root.join("usr/lib/x86_64-linux-gnu/qemu"),
                );
        }
    }
}

/// Guest RAM added beyond [`VmConfig::memory_mib`] so that QEMU 7.2 tracks every TCG write
/// during a live migration.
///
/// QEMU 7.2's dirty-bitmap sync has a fast path for RAM blocks whose size is a multiple of 64
/// pages. It clears the migration dirty bits without resetting the TCG TLB's not-dirty flags,
/// so writes through TLB entries cached before the sync are never marked, and a live migration
/// leaves stale pages on the destination (a busy guest often panics there). Upstream fixed it
/// in QEMU 9.0 (commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG
/// memory access"); Debian 12 ships 7.2. With 8 KiB more RAM the block's size misses the
/// alignment and the sync takes its per-page path, which does reset the flags: QEMU's own
/// migration then ends bit-identical (qemu-shim/tests/native.rs).
pub const TCG_TRACKING_PAD: u64 = 8 << 10;

/// Bytes of guest RAM a VM started with `memory_mib` has.
pub fn ram_bytes(memory_mib: u32) -> u64 {
    (u64::from(memory_mib) << 20) + TCG_TRACKING_PAD
}

/// How to run one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// A name for files and logs.
    pub name: String,
    /// Directory for the QMP socket and the console log.
    pub dir: PathBuf,
    /// Guest memory ([`TCG_TRACKING_PAD`] is added to it).
    pub memory_mib: u32,
    /// Memory the workload fills.
    pub fill_mib: u32,
    /// Pages the workload dirties per second.
    pub dirty_rate: u32,
    /// `-incoming` URI: this VM waits for a migration.
    pub incoming: Option<String>,
    /// Start paused (`-S`).
    pub paused: bool,
    /// Run QEMU in this network namespace (`ip netns exec`), so that its TCP migration uses the
    /// namespace's link.
    pub netns: Option<String>,
    /// Back all guest memory when QEMU starts (`-mem-prealloc`) rather than as it is first
    /// written: a destination then loads a migration into memory the kernel has already
    /// allocated and cleared.
    pub prealloc: bool,
    /// Which QEMU.
    pub qemu: QemuBuild,
    /// The machine type (`-machine`); QEMU's default (`pc`, its newest i440FX type) without.
    /// A VM migrating to a newer QEMU runs there with the machine type of the older one.
    pub machine: Option<String>,
    /// Virtual CPUs (`-smp`).
    pub cpus: u32,
    /// Further devices, as QEMU arguments (`-device ...`, `-drive ...`, `-netdev ...`): the
    /// test guest has no NIC and no disk without them. A destination needs the source's.
    pub devices: Vec<String>,
}

/// A running QEMU.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    /// Its QMP connection.
    pub qmp: Qmp,
    /// The serial console's log file.
    pub console: PathBuf,
    /// The name given in the config.
    pub name: String,
}

/// Why a VM could not be run or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QEMU did not start.
    #[error("cannot start QEMU ({0})")]
    Start(#[source] std::io::Error),
    /// QMP failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// The guest did not do what was awaited.
    #[error("{0}")]
    Guest(String),
}

impl QemuVm {
    /// Starts a VM running the test guest.
    pub fn start(guest: &Guest, config: &VmConfig) -> Result<Self, VmError> {
        std::fs::create_dir_all(&config.dir).map_err(VmError::Start)?;
        let qmp_path = config.dir.join(format!("{}.qmp", config.name));
        let console = config.dir.join(format!("{}.console", config.name));
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&console);
        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(config.qemu.program());
                c
            }
            None => Command::new(config.qemu.program()),
        };
        config.qemu.configure(&mut cmd);
        cmd.args(["-accel", "tcg,thread=multi", "-nographic", "-no-reboot"])
            .args(["-smp", &config.cpus.to_string()])
            .args(["-m", &format!("{}k", ram_bytes(config.memory_mib) >> 10)])
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 quiet panic=-1 pagestream.fill={} pagestream.rate={}",
                    config.fill_mib, config.dirty_rate
                ),
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-monitor", "none", "-nic", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(uri) = &config.incoming {
            cmd.args(["-incoming", uri]);
        }
        if config.paused {
            cmd.arg("-S");
        }
        if config.prealloc {
            cmd.arg("-mem-prealloc");
        }
        if let Some(machine) = &config.machine {
            cmd.args(["-machine", machine]);
        }
        cmd.args(&config.devices);
        let child = cmd.spawn().map_err(VmError::Start)?;
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(20))?;
        Ok(QemuVm {
            child,
            qmp,
            console,
            name: config.name.clone(),
        })
    }

    /// The console output so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `pattern` at least `count` times.
    pub fn wait_console(
        &self,
        pattern: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.console_text().matches(pattern).count() >= count {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(VmError::Guest(format!(
            "{}: console did not show '{pattern}' {count} times within {timeout:?}; it shows: {}",
            self.name,
            self.console_text()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )))
    }

    /// Sets migration capabilities.
    pub fn capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.qmp
            .execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }

    /// Sets migration parameters.
    pub fn parameters(&mut self, params: Value) -> Result<(), VmError> {
        self.qmp.execute("migrate-set-parameters", params)?;
        Ok(())
    }

    /// Starts listening for an incoming migration (for a VM started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmError> {
        self.qmp
            .execute("migrate-incoming", json!({ "uri": uri }))?;
        Ok(())
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.qmp.execute("cont", json!({}))?;
        Ok(())
    }

    /// Starts a migration to `uri`.
    pub fn migrate(&mut self, uri: &str) -> Result<(), VmError> {
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        Ok(())
    }

    /// Waits until the migration ends; returns the final `query-migrate`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.execute("query-migrate", json!({}))?;
            match info["status"].as_str().unwrap_or("") {
                "completed" | "failed" | "cancelled" => return Ok(info),
                _ if Instant::now() >= deadline => {
                    return Err(VmError::Guest(format!(
                        "{}: migration still {} after {timeout:?}",
                        self.name, info["status"]
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The run state (`running`, `paused`, `postmigrate`, `inmigrate`...).
    pub fn status(&mut self) -> Result<String, VmError> {
        let info = self.qmp.execute("query-status", json!({}))?;
        Ok(info["status"].as_str().unwrap_or("").to_string())
    }

    /// Saves guest physical memory `0..bytes` to `path`.
    pub fn pmemsave(&mut self, path: &Path, bytes: u64) -> Result<(), VmError> {
        self.qmp.execute(
            "pmemsave",
            json!({ "val": 0, "size": bytes, "filename": path.display().to_string() }),
        )?;
        Ok(())
    }

    /// Guest physical memory `0..bytes`, through a `pmemsave` to `path`.
    pub fn memory(&mut self, path: &Path, bytes: u64) -> Result<Vec<u8>, VmError> {
        self.pmemsave(path, bytes)?;
        let memory = std::fs::read(path).map_err(|e| {
            VmError::Guest(format!(
                "cannot read the memory dump {}: {e}",
                path.display()
            ))
        })?;
        if memory.len() as u64 != bytes {
            return Err(VmError::Guest(format!(
                "the memory dump {} holds {} bytes, not {bytes}",
                path.display(),
                memory.len()
            )));
        }
        Ok(memory)
    }

    /// Waits up to `timeout` for an incoming migration to be loaded; returns the state QEMU
    /// is in then (`paused` for a destination started with `-S`).
    pub fn wait_loaded(&mut self, timeout: Duration) -> Result<String, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if status != "inmigrate" {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(VmError::Guest(format!(
                    "still loading the incoming migration after {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The QEMU process's id (`ip netns exec` runs QEMU in its own process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QEMU process's resident memory (`VmRSS`), bytes.
    pub fn resident_bytes(&self) -> Result<u64, VmError> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path)
            .map_err(|e| VmError::Guest(format!("cannot read {path}: {e}")))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
            .ok_or_else(|| VmError::Guest(format!("{path} has no VmRSS line in kB")))
    }

    /// Whether the QEMU process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The indexes of the 4 KiB pages that differ between two memory dumps of the same size (and
/// of the tail of the longer one, if they differ in size).
pub fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    const PAGE: usize = 4096;
    let pages = a.len().max(b.len()).div_ceil(PAGE);
    fn page(m: &[u8], i: usize) -> &[u8] {
        let start = (i * PAGE).min(m.len());
        &m[start..((i + 1) * PAGE).min(m.len())]
    }
    (0..pages).filter(|&i| page(a, i) != page(b, i)).collect()
}

/// Checks that two memory dumps are bit-identical; the error names how many pages differ and
/// the first few.
pub fn check_identical(a: &[u8], b: &[u8], what: &str) -> Result<(), String> {
    let differing = differing_pages(a, b);
    if differing.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = differing
        .iter()
        .take(8)
        .map(|i| format!("{i:#x}"))
        .collect();
    Err(format!(
        "{} pages differ {what} (first: {})",
        differing.len(),
        first.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_dumps_are_compared_page_by_page() {
        let a = vec![7u8; 4 * 4096];
        let mut b = a.clone();
        assert!(differing_pages(&a, &b).is_empty());
        assert!(check_identical(&a, &b, "here").is_ok());
        b[4096 + 17] ^= 1;
        b[3 * 4096] ^= 1;
        assert_eq!(differing_pages(&a, &b), vec![1, 3]);
        let err = check_identical(&a, &b, "between source and destination").unwrap_err();
        assert_eq!(
            err,
            "2 pages differ between source and destination (first: 0x1, 0x3)"
        );
        // A shorter dump differs in its missing pages, a partial last page included.
        assert_eq!(differing_pages(&a, &a[..4096 + 100]), vec![1, 2, 3]);
    }
}

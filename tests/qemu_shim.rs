//! Real QEMU live migrations through the pagestream shims (needs qemu-system-x86_64 and the test
//! guest from scripts/build-guest.sh; scripts/test.sh installs and builds both).
//!
//! Each test runs two QEMU processes (TCG) and the two shims as `pagestream shim send|recv`
//! processes on loopback (between two network namespaces where the link is cut), migrates a
//! guest whose workload keeps dirtying memory, and checks what a user would: the migration
//! completes, the paused source and destination hold bit-identical memory, every stream arrived
//! exactly as QEMU wrote it (the shims' end-to-end digests), and the destination guest runs on;
//! or, where something breaks, it fails on both sides with the reason and the source runs on.
//!
//! Memory is compared page by page, all of it, once the destination has loaded the migration:
//! the guest RAM is padded (`vm::TCG_TRACKING_PAD`) so that QEMU 7.2 under TCG tracks every
//! write of a live migration, which `qemu-shim/tests/native.rs` checks without the shims.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Proc, Scratch, json_summaries, read_log, tls_certificates, wait_exit, wait_listening, workspace,
};
use pagestream_benches::netns::LinkPair;
use pagestream_qemu_shim::vm::{Guest, QemuBuild, QemuVm, VmConfig, check_identical, ram_bytes};
use serde_json::json;

const MEMORY_MIB: u32 = 256;

/// How big a test guest is, and how much of it its workload fills with content before the
/// migration, MiB.
#[derive(Clone, Copy, Debug)]
struct GuestSize {
    memory_mib: u32,
    fill_mib: u32,
}

impl Default for GuestSize {
    /// The suite's guest: small, so that the suite stays quick under TCG.
    fn default() -> Self {
        GuestSize {
            memory_mib: MEMORY_MIB,
            fill_mib: 96,
        }
    }
}

/// The most memory the page codec's caches take at each end, for any guest: content for
/// duplicates and previous versions for deltas.
const PAGE_CACHES: u64 =
    pagecodec::encoder::DEFAULT_DUP_CACHE_BYTES + pagecodec::encoder::DEFAULT_DELTA_CACHE_BYTES;

/// What a shim may hold besides its page caches: its process, buffers, staging and page
/// digests.
const OTHER_MEMORY: u64 = 64 << 20;

/// The benchmark's guest (`bench qemu --mem 1024 --fill 512`).
const LARGE_GUEST: GuestSize = GuestSize {
    memory_mib: 1024,
    fill_mib: 512,
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn shim(args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_pagestream"))
            .arg("shim")
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pagestream runs"),
    )
}

/// The destination shim (feeding `dir/dst.sock`, listening on `port`, with `recv_args`) and
/// the source shim (listening on `dir/src.sock`, with `send_args`), logging to `dir/recv.log`
/// and `dir/send.log`; with `once`, each exits after one migration.
fn shims(
    dir: &Path,
    port: u16,
    send_args: &[&str],
    recv_args: &[&str],
    once: bool,
) -> (Proc, Proc) {
    let recv = recv_shim(dir, port, recv_args, once, "recv");
    let once = if once { &["--once"][..] } else { &[] };
    let listen = format!("unix:{}", dir.join("src.sock").display());
    let to = format!("127.0.0.1:{port}");
    let json = dir.join("send.json").display().to_string();
    let mut args = vec!["send", "--listen", &listen, "--to", &to];
    args.extend_from_slice(once);
    args.extend_from_slice(&["--summary-json", &json]);
    args.extend_from_slice(send_args);
    let send = shim(&args, &dir.join("send.log"));
    wait_listening(&dir.join("src.sock"));
    (recv, send)
}

/// Starts a destination shim on `port` feeding `dir/dst.sock`, its log and JSON summaries in
/// `dir/NAME.log` and `dir/NAME.json`.
fn recv_shim(dir: &Path, port: u16, recv_args: &[&str], once: bool, name: &str) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let qemu = format!("unix:{}", dir.join("dst.sock").display());
    let json = dir.join(format!("{name}.json")).display().to_string();
    let mut args = vec!["recv", "--listen", &listen, "--qemu", &qemu];
    if once {
        args.push("--once");
    }
    args.extend_from_slice(&["--summary-json", &json]);
    args.extend_from_slice(recv_args);
    shim(&args, &dir.join(format!("{name}.log")))
}

/// Waits until the migration of `src` has sent `bytes`, while it is still under way: whatever
/// a test does next happens mid-migration.
fn wait_under_way(src: &mut QemuVm, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = src.qmp.execute("query-migrate", json!({})).unwrap();
        assert!(
            info["status"] == "setup" || info["status"] == "active",
            "the migration is over already: {info}"
        );
        if info["ram"]["transferred"].as_u64().unwrap_or(0) > bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the migration does not start: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the source VM, waits for its workload, and migrates it into the source shim at
/// `src_sock`, with QEMU's bandwidth limit out of the way.
fn start_migrating(guest: &Guest, dir: &Path, src_sock: &Path) -> QemuVm {
    let mut src = vm(guest, dir, "src", None, 2000);
    src.wait_console("pagestream-workload tick", 2, Duration::from_secs(90))
        .unwrap();
    src.parameters(json!({"max-bandwidth": 1u64 << 40}))
        .unwrap();
    src.migrate(&format!("unix:{}", src_sock.display()))
        .unwrap();
    src
}

fn vm(guest: &Guest, dir: &Path, name: &str, incoming: Option<&str>, dirty_rate: u32) -> QemuVm {
    vm_of(&Emulator::default(), guest, dir, name, incoming, dirty_rate)
}

/// Which QEMU runs a VM, with which machine type (QEMU's default without).
#[derive(Default)]
struct Emulator {
    build: QemuBuild,
    machine: Option<&'static str>,
    /// Equipped as a production VM is ([`production_devices`]), on a q35 machine with 2 CPUs;
    /// the bare test guest (1 CPU, no NIC, no disk) without.
    production: bool,
    size: GuestSize,
}

/// The devices of a VM set up as production VMs are: virtio NIC and disk behind PCI Express
/// root ports, a virtio RNG, serial port and balloon, a USB controller with a tablet, and a VGA
/// card. Their states and RAM blocks (option ROMs, video memory) join the migration stream;
/// the NIC's user-mode network has state that migrates too. The disk's image lies in `dir`,
/// where both VMs open it, as on shared storage.
fn production_devices(dir: &Path) -> Vec<String> {
    let disk = dir.join("disk.raw");
    // Made by the first VM; the second opens the same image.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    [
        "-device",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
        "-device",
        "pcie-root-port,id=rp2,bus=pcie.0,chassis=2",
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0,bus=rp1",
        "-drive",
        &format!("file={},if=none,id=disk0,format=raw", disk.display()),
        "-device",
        "virtio-blk-pci,drive=disk0,bus=rp2",
        "-device",
        "virtio-rng-pci",
        "-device",
        "virtio-serial-pci",
        "-device",
        "virtio-balloon-pci",
        "-device",
        "qemu-xhci,id=usb",
        "-device",
        "usb-tablet,bus=usb.0",
        "-vga",
        "std",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

/// Like [`vm`], run by `qemu`.
fn vm_of(
    qemu: &Emulator,
    guest: &Guest,
    dir: &Path,
    name: &str,
    incoming: Option<&str>,
    dirty_rate: u32,
) -> QemuVm {
    QemuVm::start(
        guest,
        &VmConfig {
            name: name.into(),
            dir: dir.to_path_buf(),
            memory_mib: qemu.size.memory_mib,
            fill_mib: qemu.size.fill_mib,
            dirty_rate,
            incoming: incoming.map(str::to_string),
            paused: incoming.is_some(),
            netns: None,
            prealloc: false,
            qemu: qemu.build.clone(),
            machine: match qemu.machine {
                Some(machine) => Some(machine.to_string()),
                None => qemu.production.then(|| "q35".to_string()),
            },
            cpus: if qemu.production { 2 } else { 1 },
            devices: if qemu.production {
                production_devices(dir)
            } else {
                Vec::new()
            },
        },
    )
    .expect("QEMU starts")
}

/// Waits until an incoming VM has loaded its migration (it leaves the `inmigrate` state).
fn wait_loaded(vm: &mut QemuVm) {
    let status = vm.wait_loaded(Duration::from_secs(60)).unwrap();
    assert_eq!(
        status, "paused",
        "the destination did not load the migration"
    );
}

fn memory(vm: &mut QemuVm, path: &Path) -> Vec<u8> {
    memory_of(vm, path, GuestSize::default())
}

/// The memory of a VM whose guest is `size`.
fn memory_of(vm: &mut QemuVm, path: &Path, size: GuestSize) -> Vec<u8> {
    vm.memory(path, ram_bytes(size.memory_mib)).unwrap()
}

struct Setup {
    scratch: Scratch,
    src: QemuVm,
    dst: QemuVm,
    recv: Proc,
    send: Proc,
    /// Where the destination shim listens.
    port: u16,
    size: GuestSize,
}

/// Two VMs and two shims, ready to migrate; `caps` set on both VMs.
fn setup(name: &str, caps: &[(&str, bool)], params: serde_json::Value) -> Setup {
    setup_with(name, caps, params, &[], 2000)
}

/// Like [`setup`], with extra arguments for `shim send` and a guest dirty rate.
fn setup_with(
    name: &str,
    caps: &[(&str, bool)],
    params: serde_json::Value,
    send_args: &[&str],
    dirty_rate: u32,
) -> Setup {
    setup_sides(
        name,
        caps,
        params,
        dirty_rate,
        Sides {
            send_args,
            ..Sides::default()
        },
    )
}

/// What differs between the two hosts of a [`setup_sides`].
#[derive(Default)]
struct Sides<'a> {
    send_args: &'a [&'a str],
    recv_args: &'a [&'a str],
    /// Capabilities and parameters of the destination QEMU alone.
    dst_caps: &'a [(&'a str, bool)],
    dst_params: Option<serde_json::Value>,
    /// Both shims stay up after a migration (no `--once`).
    stay_up: bool,
    /// QEMU's own TLS between the two QEMUs, with certificates the test makes in its scratch
    /// directory ([`tls_certificates`]).
    tls: bool,
    /// Both VMs run QEMU 10 (`scripts/install-qemu10.sh`) rather than the system's 7.2.
    qemu10: bool,
    /// The destination alone runs QEMU 10, with the source's machine type (pc-i440fx-7.2): a
    /// VM moving to an upgraded host.
    dst_qemu10: bool,
    /// Both VMs equipped as production VMs are (see [`Emulator::production`]).
    production: bool,
    /// Both guests' size.
    size: GuestSize,
}

/// Like [`setup_with`], with whatever differs between the hosts in `sides`.
fn setup_sides(
    name: &str,
    caps: &[(&str, bool)],
    params: serde_json::Value,
    dirty_rate: u32,
    sides: Sides<'_>,
) -> Setup {
    let Sides {
        send_args,
        recv_args,
        dst_caps,
        dst_params,
        stay_up,
        tls,
        qemu10,
        dst_qemu10,
        production,
        size,
    } = sides;
    let guest = Guest::locate(&workspace()).expect("test guest (scripts/build-guest.sh)");
    let qemu10_build =
        || QemuBuild::qemu10(&workspace()).expect("QEMU 10 (scripts/install-qemu10.sh)");
    let src_qemu = Emulator {
        build: if qemu10 {
            qemu10_build()
        } else {
            QemuBuild::System
        },
        machine: None,
        production,
        size,
    };
    let dst_qemu = if dst_qemu10 {
        Emulator {
            build: qemu10_build(),
            machine: Some("pc-i440fx-7.2"),
            production,
            size,
        }
    } else {
        Emulator {
            build: src_qemu.build.clone(),
            machine: None,
            production,
            size,
        }
    };
    let scratch = Scratch::new(name);
    let dir = scratch.0.clone();
    let certs = tls.then(|| tls_certificates(&dir));
    let dst_sock = dir.join("dst.sock");
    let port = free_port();
    let mut dst = vm_of(&dst_qemu, &guest, &dir, "dst", Some("defer"), dirty_rate);
    let mut params = params;
    if let Some(certs) = &certs {
        add_tls_credentials(&mut dst, certs, "server");
        params["tls-creds"] = json!("tls0");
    }
    dst.capabilities(caps).unwrap();
    dst.parameters(params.clone()).unwrap();
    dst.capabilities(dst_caps).unwrap();
    if let Some(p) = dst_params {
        dst.parameters(p).unwrap();
    }
    dst.migrate_incoming(&format!("unix:{}", dst_sock.display()))
        .unwrap();
    let (recv, send) = shims(&dir, port, send_args, recv_args, !stay_up);
    let mut src = vm_of(&src_qemu, &guest, &dir, "src", None, dirty_rate);
    src.wait_console("pagestream-workload tick", 2, Duration::from_secs(90))
        .unwrap();
    src.capabilities(caps).unwrap();
    if let Some(certs) = &certs {
        add_tls_credentials(&mut src, certs, "client");
        // The certificate names the destination "localhost"; over a unix socket QEMU needs
        // the name it is to check.
        params["tls-hostname"] = json!("localhost");
    }
    if params.get("max-bandwidth").is_none() {
        params["max-bandwidth"] = json!(1u64 << 40);
    }
    src.parameters(params).unwrap();
    Setup {
        scratch,
        src,
        dst,
        recv,
        send,
        port,
        size,
    }
}

fn log(s: &Setup, name: &str) -> String {
    read_log(&s.scratch.0, name)
}

/// The one summary a `--once` shim wrote with `--summary-json` to `dir/name`, checked against
/// what it says of itself.
fn json_summary(dir: &Path, name: &str, side: &str) -> serde_json::Value {
    let text = read_log(dir, name);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one summary per migration: {text}");
    let summary: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(summary["side"], side, "{summary}");
    assert_eq!(
        summary["completed"],
        summary["error"].is_null(),
        "completed exactly when there is no error: {summary}"
    );
    summary
}

/// Migrates, then checks: completed, identical memory, every stream verified end to end, shims
/// report success, and the destination runs.
///
/// `send_says` and `recv_says`: what the source and the destination summaries must say of the
/// mode that ran (and why: only the source knows why it carried a stream opaque).
fn migrate_and_verify(mut s: Setup, send_says: &[&str], recv_says: &[&str]) {
    migrate(&mut s);
    verify_migration(s, send_says, recv_says);
}

/// Starts the migration to the source shim.
fn migrate(s: &mut Setup) {
    let src_sock = s.scratch.0.join("src.sock");
    s.src
        .migrate(&format!("unix:{}", src_sock.display()))
        .unwrap();
}

/// The checks of [`migrate_and_verify`], for a migration already under way. Returns the source
/// QEMU's last `query-migrate`.
fn verify_migration(mut s: Setup, send_says: &[&str], recv_says: &[&str]) -> serde_json::Value {
    check_migration(&mut s, send_says, recv_says)
}

/// [`verify_migration`], leaving the VMs to the caller for further checks.
fn check_migration(s: &mut Setup, send_says: &[&str], recv_says: &[&str]) -> serde_json::Value {
    let info = s.src.wait_migration(Duration::from_secs(180)).unwrap();
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsend: {}\nrecv: {}",
        log(s, "send.log"),
        log(s, "recv.log")
    );
    // The source says "completed" once it has sent everything (without the return path it does
    // not hear from the destination): the last bytes may still be on their way through the
    // shims. Look at the destination only once it has loaded them.
    wait_loaded(&mut s.dst);
    let a = memory_of(&mut s.src, &s.scratch.0.join("src.mem"), s.size);
    let b = memory_of(&mut s.dst, &s.scratch.0.join("dst.mem"), s.size);
    check_identical(&a, &b, "between source and destination").unwrap();
    let dir = s.scratch.0.clone();
    let mut tls = false;
    for (p, name, mode) in [
        (&mut s.send, "send.log", send_says),
        (&mut s.recv, "recv.log", recv_says),
    ] {
        let status = wait_exit(p, Duration::from_secs(20)).expect("shim exits after --once");
        let text = read_log(&dir, name);
        assert!(
            status.success(),
            "{name}: {text}\n--- send.log ---\n{}\n--- recv.log ---\n{}",
            read_log(&dir, "send.log"),
            read_log(&dir, "recv.log")
        );
        assert!(text.contains("completed"), "{name}: {text}");
        for said in mode {
            assert!(
                text.contains(said),
                "{name} must say which mode ran and why ({said:?}): {text}"
            );
        }
        // Each shim checks what it received (the destination the migration stream, the source
        // the return path) against the sender's length and digest, on every connection.
        let connections = text
            .split("QEMU connection(s)")
            .next()
            .and_then(|head| head.split_whitespace().last())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("{name} reports its connections: {text}"));
        assert!(connections >= 1, "{name}: {text}");
        assert!(
            text.contains(&format!(
                "{connections} of {connections} incoming stream(s) verified end to end"
            )),
            "{name}: {text}"
        );
        // The same, for programs.
        let (json, side) = match name {
            "send.log" => ("send.json", "source shim"),
            _ => ("recv.json", "destination shim"),
        };
        let summary = json_summary(&dir, json, side);
        assert_eq!(summary["completed"], true, "{summary}");
        assert_eq!(summary["qemu_connections"], connections, "{summary}");
        assert_eq!(summary["verified_streams"], connections, "{summary}");
        // Every connection's bytes count, raw and on the link: the workload's filled memory
        // crosses the link, however it is compressed. (The parsed main channel's counts once
        // overwrote what the multifd channels' relays added beside them: 52 KB reported on the
        // link for 137 MB, and at the destination 0.7 MiB raw for 72 MiB on the link.)
        assert!(
            summary["stream"]["raw_bytes"].as_u64().unwrap() > 8 << 20,
            "{summary}"
        );
        assert!(
            summary["stream"]["wire_bytes"].as_u64().unwrap() > 8 << 20,
            "{summary}"
        );
        // What each shim cost its host, as its summary reports it.
        let peak = summary["process"]["peak_resident_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no peak resident memory: {summary}"));
        assert!(
            summary["process"]["cpu_s"]
                .as_f64()
                .is_some_and(|s| s > 0.0),
            "{summary}"
        );
        // Each shim's buffering is bounded (QEMU must feel the link's pace), and its page
        // caches hold at most `PAGE_CACHES` whatever the guest's size; beyond them a shim holds
        // its buffers, its staging and 16 bytes per page sent, for which `OTHER_MEMORY` allows.
        // Measured: 100-117 MiB per shim for the large guest, 151-163 MiB with a busier guest
        // on more channels; with the destination's staging unbounded, 278 MiB.
        assert!(
            peak < PAGE_CACHES + OTHER_MEMORY,
            "{name}: the shim held {} MiB, more than its page caches and buffers may take: \
             {summary}",
            peak >> 20
        );
        // Both shims read the end of the source's stream: a finished migration's, except under
        // QEMU's own TLS, where there is nothing to read (the source shim, first here, says
        // why it carried the stream opaque).
        if side == "source shim" {
            tls = summary["mode"]
                .as_str()
                .is_some_and(|m| m.contains("QEMU's TLS"));
        }
        let finished = if tls { json!(null) } else { json!(true) };
        assert_eq!(summary["source_finished"], finished, "{summary}");
    }
    // The destination guest runs on: its workload keeps printing.
    let ticks_before = s
        .dst
        .console_text()
        .matches("pagestream-workload tick")
        .count();
    s.dst.resume().unwrap();
    s.dst
        .wait_console(
            "pagestream-workload tick",
            ticks_before + 2,
            Duration::from_secs(60),
        )
        .unwrap();
    info
}

/// What a summary says of parsing mode.
const PARSING: &str = "mode parsing (RAM pages through the page codec";
/// What a summary says of opaque mode.
const OPAQUE: &str = "mode opaque (";

#[test]
fn migrates_through_the_shim_with_identical_memory() {
    let s = setup("plain", &[], json!({}));
    let says = &[PARSING, "1 QEMU connection(s)", "pages: "];
    migrate_and_verify(s, says, says);
}

/// `--dup-cache 0 --delta-cache 0` on the source shim turns the page caches off at both ends
/// (the destination's decoders take the sizes the source announces): with the large guest,
/// whose content fills the default caches, neither shim holds more than `OTHER_MEMORY` (with
/// the caches: 100-117 MiB each; without: 21 and 31 MiB), no page goes as a duplicate or a
/// delta, and the memory arrives identical.
#[test]
fn a_large_guest_migrates_without_page_caches_in_little_memory() {
    let mut s = setup_sides(
        "no-caches",
        &[],
        json!({}),
        2000,
        Sides {
            send_args: &["--dup-cache", "0", "--delta-cache", "0"],
            size: LARGE_GUEST,
            ..Sides::default()
        },
    );
    migrate(&mut s);
    check_migration(&mut s, &[PARSING], &[PARSING]);
    for (json, side) in [
        ("send.json", "source shim"),
        ("recv.json", "destination shim"),
    ] {
        let summary = json_summary(&s.scratch.0, json, side);
        let pages = &summary["pages"];
        assert_eq!(pages["duplicate"], 0, "{side}: {pages}");
        assert_eq!(pages["delta"], 0, "{side}: {pages}");
        let peak = summary["process"]["peak_resident_bytes"].as_u64().unwrap();
        assert!(
            peak < OTHER_MEMORY,
            "{side} held {} MiB without page caches: {summary}",
            peak >> 20
        );
    }
}

/// A VM equipped as production VMs are (q35, 2 CPUs, virtio devices behind PCI Express root
/// ports, a disk, USB, VGA): its RAM blocks and device sections, more and other than the bare
/// test guest's, are parsed and carried, memory bit for bit, and the guest runs on.
///
/// The guest keeps its disk and NIC busy (`qemu-shim/guest/init`): both work before the
/// migration, and on at the destination after it, no block lost.
#[test]
fn a_q35_vm_with_two_cpus_and_busy_virtio_devices_migrates_in_parsing_mode() {
    let sides = Sides {
        production: true,
        ..Sides::default()
    };
    let mut s = setup_sides("q35", &[], json!({}), 2000, sides);
    for busy in [DISK_OK, NET_OK] {
        s.src
            .wait_console(busy, 2, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the source guest's devices work ({busy}): {e}"));
    }
    migrate(&mut s);
    let says = &[PARSING, "1 QEMU connection(s)"];
    check_migration(&mut s, says, says);
    // The destination runs (checked above); its disk and NIC work too.
    let console = s.dst.console_text();
    for busy in [DISK_OK, NET_OK] {
        let before = console.matches(busy).count();
        s.dst
            .wait_console(busy, before + 2, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the destination guest's devices work ({busy}): {e}"));
    }
    for vm in [&s.src, &s.dst] {
        let console = vm.console_text();
        assert!(
            !console.contains("pagestream-disk lost"),
            "{}: a block written to the disk did not come back: {console}",
            vm.name
        );
    }
}

/// What the test guest prints for each block its virtio disk gave back as written.
const DISK_OK: &str = "pagestream-disk ok";
/// What the test guest prints for each ping its virtio NIC got an answer to.
const NET_OK: &str = "pagestream-net ok";

/// QEMU 10 (Debian 13's, from bookworm-backports) at both ends: its stream is parsed and
/// rebuilt as 7.2's is, memory bit for bit.
#[test]
fn migrates_between_qemu10s_through_the_shim_in_parsing_mode() {
    let sides = Sides {
        qemu10: true,
        ..Sides::default()
    };
    let s = setup_sides("qemu10", &[], json!({}), 2000, sides);
    migrate_and_verify(s, &[PARSING], &[PARSING]);
}

/// QEMU 10's multifd: the main channel parsed (with QEMU 10's MULTIFD_FLUSH records), the
/// multifd channels carried opaque beside it.
#[test]
fn migrates_between_qemu10s_with_multifd_through_the_shim() {
    let sides = Sides {
        qemu10: true,
        ..Sides::default()
    };
    let s = setup_sides(
        "qemu10-multifd",
        &[("multifd", true)],
        json!({"multifd-channels": 2}),
        2000,
        sides,
    );
    let says = &[PARSING, "3 QEMU connection(s)"];
    migrate_and_verify(s, says, says);
}

/// Which shim a second migration meets busy with a first.
enum Busy {
    /// The same source shim.
    Source,
    /// Another source shim, sending to the same destination shim.
    Destination,
}

/// A second VM migrating while a first one is carried: refused by the busy shim (its migration
/// fails at once and it runs on), while the first migration completes with identical memory:
/// nothing of the second VM reaches the first one's destination.
fn second_migration_meets_a_busy_shim(name: &str, busy: Busy) {
    let mut s = setup(name, &[], json!({}));
    let guest = Guest::locate(&workspace()).expect("test guest (scripts/build-guest.sh)");
    let dir = s.scratch.0.clone();
    let src_sock = dir.join("src.sock");
    // The second VM's source shim: the same one, or one of its own for the same destination.
    let (other_sock, _other_shim, other_log) = match busy {
        Busy::Source => (src_sock.clone(), None, "send.log"),
        Busy::Destination => {
            let sock = dir.join("src2.sock");
            let (listen, to) = (
                format!("unix:{}", sock.display()),
                format!("127.0.0.1:{}", s.port),
            );
            let args = ["send", "--listen", &listen, "--to", &to, "--once"];
            let shim = shim(&args, &dir.join("send2.log"));
            wait_listening(&sock);
            (sock, Some(shim), "send2.log")
        }
    };
    let mut other = vm(&guest, &dir, "other", None, 2000);
    other
        .wait_console("pagestream-workload tick", 2, Duration::from_secs(90))
        .unwrap();
    // The first migration held back by QEMU's own limit, so that the second comes while it runs.
    s.src
        .parameters(json!({"max-bandwidth": 16u64 << 20}))
        .unwrap();
    s.src
        .migrate(&format!("unix:{}", src_sock.display()))
        .unwrap();
    wait_under_way(&mut s.src, 2 << 20);
    other
        .migrate(&format!("unix:{}", other_sock.display()))
        .unwrap();
    let info = other
        .wait_migration(Duration::from_secs(30))
        .expect("no hang for the refused VM");
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(other.status().unwrap(), "running");
    let said = read_log(&dir, other_log);
    assert!(said.contains("one migration at a time"), "{said}");
    s.src
        .parameters(json!({"max-bandwidth": 1u64 << 40}))
        .unwrap();
    let says = &[PARSING, "1 QEMU connection(s)"];
    verify_migration(s, says, says);
}

#[test]
fn a_second_migration_into_a_busy_source_shim_is_refused() {
    second_migration_meets_a_busy_shim("busy-src", Busy::Source);
}

#[test]
fn a_second_migration_into_a_busy_destination_shim_is_refused() {
    second_migration_meets_a_busy_shim("busy-dst", Busy::Destination);
}

#[test]
fn migrates_with_multifd_through_the_shim() {
    // The main channel parsed, the two multifd channels carried opaque beside it.
    let s = setup(
        "multifd",
        &[("multifd", true)],
        json!({ "multifd-channels": 2 }),
    );
    let says = &[PARSING, "3 QEMU connection(s)"];
    migrate_and_verify(s, says, says);
}

#[test]
fn migrates_with_the_return_path_through_the_shim() {
    let s = setup("return-path", &[("return-path", true)], json!({}));
    let says = &[PARSING, LOADED];
    migrate_and_verify(s, says, says);
}

/// What a shim says when the destination QEMU confirmed on its return path that it loaded the
/// migration.
const LOADED: &str = "the destination QEMU loaded it (it said so on the return path)";

/// Migration parameters for a guest that dirties 20 000 pages a second. These tests check that
/// what arrives is right, not how fast: on a loaded machine (CI runs the tests side by side, and
/// under TCG every dirty-bitmap sync of the padded RAM is slow) QEMU's default 300 ms downtime
/// limit can keep such a guest from ever switching over, so it may take up to 2 s.
fn busy_guest_params() -> serde_json::Value {
    json!({"downtime-limit": 2000})
}

#[test]
fn a_busy_guest_migrates_in_parsing_mode_over_many_channels() {
    let s = setup_with(
        "busy-parsing",
        &[("return-path", true)],
        busy_guest_params(),
        &["--channels", "5"],
        20000,
    );
    let says = &[PARSING, "on 5 channel(s)"];
    migrate_and_verify(s, says, says);
}

#[test]
fn a_stream_with_xbzrle_is_parsed_until_its_first_delta() {
    // XBZRLE records patch the destination's copy of a page: the shim cannot turn them into
    // pages, so from the first one on it carries the stream as it is, and says so.
    // 30 MB/s: several passes, so that pages dirtied again go as XBZRLE deltas.
    let s = setup(
        "xbzrle",
        &[("xbzrle", true)],
        json!({ "max-bandwidth": 30_000_000u64 }),
    );
    let says = &[
        PARSING,
        "carried as bytes because of a RAM record of kind XBZRLE",
    ];
    migrate_and_verify(s, says, says);
}

#[test]
fn a_postcopy_capable_stream_is_carried_opaque() {
    // Postcopy changes how RAM travels; the stream says so before its RAM section, so nothing
    // was parsed yet and the whole main channel goes opaque.
    let s = setup("postcopy", &[("postcopy-ram", true)], json!({}));
    migrate_and_verify(
        s,
        &["mode opaque (the main channel's stream cannot be parsed: postcopy"],
        &[OPAQUE],
    );
}

/// A migration switched to postcopy midway (QMP `migrate-start-postcopy`, what `virsh
/// migrate-postcopy` sends): the destination QEMU takes over and asks for pages over the
/// return path, which the shims carry back, while the source pushes the rest.
#[test]
fn a_migration_switched_to_postcopy_completes_through_the_shim() {
    let s = setup("postcopy-switch", &[("postcopy-ram", true)], json!({}));
    let s = switch_to_postcopy(s);
    verify_migration(s, POSTCOPY_SAYS, &[OPAQUE, LOADED, "1 QEMU connection(s)"]);
}

/// The same with `postcopy-preempt`: the source QEMU also opens a connection that it says
/// nothing on until postcopy needs it, and the destination QEMU waits for it before loading.
#[test]
fn a_postcopy_preempt_migration_completes_through_the_shim() {
    let s = setup("postcopy-preempt", PREEMPT_CAPS, json!({}));
    let s = switch_to_postcopy(s);
    verify_migration(s, POSTCOPY_SAYS, &[OPAQUE, LOADED, "2 QEMU connection(s)"]);
}

/// The same with QEMU 10, whose source opens the preempt connection only when postcopy starts
/// and writes a page record on it at once: the source shim takes it by those bytes, which open
/// no other kind of connection.
#[test]
fn a_qemu10_postcopy_preempt_migration_completes_through_the_shim() {
    let sides = Sides {
        qemu10: true,
        ..Sides::default()
    };
    let s = setup_sides("postcopy-preempt-10", PREEMPT_CAPS, json!({}), 2000, sides);
    let s = switch_to_postcopy(s);
    verify_migration(s, POSTCOPY_SAYS, &[OPAQUE, LOADED, "2 QEMU connection(s)"]);
}

/// postcopy-preempt with a destination that runs as soon as postcopy starts: its guest touches
/// pages that have not come yet (it writes fast, and postcopy's bandwidth is capped), asks for
/// them over the return path, and the source sends them on the preempt connection.
#[test]
fn a_running_destination_gets_the_pages_it_asks_for_over_postcopy_preempt() {
    let params = json!({"max-postcopy-bandwidth": 32u64 << 20});
    let mut s = setup_with("postcopy-ask", PREEMPT_CAPS, params, &[], 20_000);
    // `cont` before the migration: the destination runs once postcopy starts.
    s.dst.resume().unwrap();
    let mut s = switch_to_postcopy(s);
    let info = s.src.wait_migration(Duration::from_secs(180)).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    let requests = info["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
    assert!(requests > 0, "the destination asked for no page: {info}");
    let dir = s.scratch.0.clone();
    for (p, name, json, side) in [
        (&mut s.send, "send.log", "send.json", "source shim"),
        (&mut s.recv, "recv.log", "recv.json", "destination shim"),
    ] {
        let status = wait_exit(p, Duration::from_secs(20)).expect("shim exits after --once");
        assert!(status.success(), "{name}: {}", read_log(&dir, name));
        let summary = json_summary(&dir, json, side);
        assert_eq!(summary["completed"], true, "{summary}");
        // Both connections, each checked end to end against the sender's digest.
        assert_eq!(summary["qemu_connections"], 2, "{summary}");
        assert_eq!(summary["verified_streams"], 2, "{summary}");
    }
    assert_eq!(s.dst.status().unwrap(), "running");
    let ticks = s
        .dst
        .console_text()
        .matches("pagestream-workload tick")
        .count();
    s.dst
        .wait_console(
            "pagestream-workload tick",
            ticks + 2,
            Duration::from_secs(60),
        )
        .unwrap();
}

/// postcopy-preempt under QEMU's own TLS: the preempt connection opens with a TLS handshake
/// like the others, and is carried by its order.
#[test]
fn a_postcopy_preempt_migration_under_tls_completes_through_the_shim() {
    let sides = Sides {
        tls: true,
        ..Sides::default()
    };
    let s = setup_sides("tls-preempt", PREEMPT_CAPS, json!({}), 2000, sides);
    let s = switch_to_postcopy(s);
    verify_migration(
        s,
        &[
            OPAQUE,
            "QEMU's TLS encrypts the stream",
            "2 QEMU connection(s)",
        ],
        &[OPAQUE, "2 QEMU connection(s)"],
    );
}

/// Postcopy survives a failure of the path: the destination shim dies mid-postcopy, both QEMUs
/// pause (postcopy-paused; neither can go back), and the operator resumes through a new
/// destination shim (QMP `migrate-recover` at the destination, `migrate` with `resume` at the
/// source). The source shim, still up, takes the resumed stream, which starts with a command
/// rather than a header, and the migration completes with bit-identical memory.
#[test]
fn a_postcopy_migration_resumes_through_the_shims_after_a_shim_dies() {
    let sides = Sides {
        stay_up: true,
        ..Sides::default()
    };
    // Postcopy held to 4 MiB/s, so that it is still under way when the shim dies.
    let params = json!({"max-postcopy-bandwidth": 4u64 << 20});
    let s = setup_sides(
        "postcopy-recover",
        &[("postcopy-ram", true)],
        params,
        2000,
        sides,
    );
    let mut s = switch_to_postcopy(s);
    let dir = s.scratch.0.clone();
    // Only once the destination runs postcopy (it has loaded the device state) can it pause
    // rather than fail.
    wait_status(&mut s.dst, "destination", "postcopy-active", &dir);
    let _ = s.recv.0.kill();
    wait_status(&mut s.src, "source", "postcopy-paused", &dir);
    wait_status(&mut s.dst, "destination", "postcopy-paused", &dir);
    let dst_uri = format!("unix:{}", dir.join("dst.sock").display());
    s.dst
        .qmp
        .execute("migrate-recover", json!({ "uri": dst_uri }))
        .unwrap();
    s.src
        .parameters(json!({"max-postcopy-bandwidth": 0}))
        .unwrap();
    let src_uri = format!("unix:{}", dir.join("src.sock").display());
    s.src
        .qmp
        .execute("migrate", json!({ "uri": src_uri, "resume": true }))
        .unwrap();
    // The new destination shim comes only after the resume: the source shim waits for it.
    std::thread::sleep(Duration::from_secs(1));
    let _recv = recv_shim(&dir, s.port, &[], false, "recv2");
    let info = s.src.wait_migration(Duration::from_secs(60));
    let dst_info = s.dst.qmp.execute("query-migrate", json!({}));
    assert!(
        info.as_ref().is_ok_and(|i| i["status"] == "completed"),
        "{info:?}\ndestination: {dst_info:?}\nsend: {}\nrecv2: {}",
        read_log(&dir, "send.log"),
        read_log(&dir, "recv2.log")
    );
    wait_loaded(&mut s.dst);
    let a = memory(&mut s.src, &dir.join("src.mem"));
    let b = memory(&mut s.dst, &dir.join("dst.mem"));
    check_identical(&a, &b, "between source and destination").unwrap();
    // The source shim: the first session failed with the path, the resumed one completed.
    let sent = json_summaries(&dir.join("send.json"), 2);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0]["completed"], false, "{}", sent[0]);
    // Its return path was cut by the dead shim: not the destination QEMU's word.
    assert!(sent[0]["destination_loaded"].is_null(), "{}", sent[0]);
    assert_eq!(sent[1]["completed"], true, "{}", sent[1]);
    let mode = sent[1]["mode"].as_str().unwrap_or_default();
    assert!(mode.contains("resumed after a failure"), "{mode}");
    let received = json_summaries(&dir.join("recv2.json"), 1);
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["completed"], true, "{}", received[0]);
    assert_eq!(received[0]["session"], sent[1]["session"]);
    // The resumed return path carries the received-page bitmap raw after RECV_BITMAP; both
    // shims step over it and read the destination QEMU's word at the end.
    for summary in [&sent[1], &received[0]] {
        assert_eq!(summary["destination_loaded"], true, "{summary}");
    }
}

const PREEMPT_CAPS: &[(&str, bool)] = &[("postcopy-ram", true), ("postcopy-preempt", true)];

/// What the source shim says of a postcopy migration.
const POSTCOPY_SAYS: &[&str] = &[
    "mode opaque (the main channel's stream cannot be parsed: postcopy",
    LOADED,
];

/// Waits up to 30 s for `vm` (the `side` QEMU) to report migration status `status`; the
/// shims' logs in `dir` say why if it does not.
fn wait_status(vm: &mut QemuVm, side: &str, status: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = match vm.qmp.execute("query-migrate", json!({})) {
            Ok(info) => info,
            Err(e) => panic!("the {side} QEMU: {e} (running: {})", vm.alive()),
        };
        if info["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the {side} QEMU never reached {status}: {info}\nsend: {}\nrecv: {}",
            read_log(dir, "send.log"),
            read_log(dir, "recv.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts migrating and switches to postcopy once it is under way.
fn switch_to_postcopy(mut s: Setup) -> Setup {
    let src_sock = s.scratch.0.join("src.sock");
    s.src
        .migrate(&format!("unix:{}", src_sock.display()))
        .unwrap();
    wait_under_way(&mut s.src, 8 << 20);
    s.src
        .qmp
        .execute("migrate-start-postcopy", json!({}))
        .unwrap();
    // It did switch: postcopy lasts until the source has pushed every page left.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = s.src.qmp.execute("query-migrate", json!({})).unwrap();
        match info["status"].as_str().unwrap_or_default() {
            "postcopy-active" => return s,
            "active" | "device" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => panic!("the migration never switched to postcopy: {info}"),
        }
    }
}

#[test]
fn migrates_opaque_with_zstd_and_lz4_and_a_busy_guest() {
    for compression in ["zstd", "lz4"] {
        let s = setup_with(
            &format!("busy-{compression}"),
            &[("return-path", true)],
            busy_guest_params(),
            &["--mode", "opaque", "--compression", compression],
            20000,
        );
        migrate_and_verify(s, &[OPAQUE, "as asked (--mode opaque)"], &[OPAQUE]);
    }
}

/// The source QEMU plain, the destination QEMU loading over `channels` multifd channels that
/// its shim feeds (`--qemu-multifd`): a busy guest, so that many sections each need their
/// barriers, and the return path beside them. `hosts` says which QEMUs run.
fn migrate_into_destination_multifd(name: &str, channels: &str, hosts: Sides<'_>) {
    let count: u32 = channels.parse().expect("a channel count");
    let recv_args = ["--qemu-multifd", channels];
    let s = setup_sides(
        name,
        &[("return-path", true)],
        busy_guest_params(),
        20000,
        Sides {
            recv_args: &recv_args,
            dst_caps: &[("multifd", true)],
            dst_params: Some(json!({ "multifd-channels": count, "multifd-compression": "none" })),
            ..hosts
        },
    );
    let loading = format!("pages into the destination QEMU over its {channels} multifd channel(s)");
    migrate_and_verify(s, &[PARSING], &[PARSING, &loading]);
}

/// The benchmark's configuration at the benchmark's size (`bench qemu --mem 1024 --fill 512`,
/// method `shim`: the return path on, the destination QEMU loading over 2 multifd channels):
/// identical memory, and neither shim holding more than its page caches and buffers may take
/// ([`check_migration`]): with 512 MiB of content, a shim that queued the stream instead of
/// slowing QEMU down would.
#[test]
fn a_large_guest_migrates_with_each_shims_memory_bounded() {
    let s = setup_sides(
        "large",
        &[("return-path", true)],
        json!({}),
        2000,
        Sides {
            recv_args: &["--qemu-multifd", "2"],
            dst_caps: &[("multifd", true)],
            dst_params: Some(json!({ "multifd-channels": 2, "multifd-compression": "none" })),
            size: LARGE_GUEST,
            ..Sides::default()
        },
    );
    let loading = "pages into the destination QEMU over its 2 multifd channel(s)";
    migrate_and_verify(s, &[PARSING], &[PARSING, loading]);
}

#[test]
fn a_destination_qemu_loads_the_pages_over_its_own_multifd_channels() {
    migrate_into_destination_multifd("dest-multifd", "3", Sides::default());
}

/// The same with QEMU 10 at both ends, whose destination syncs its multifd channels where the
/// main channel says MULTIFD_FLUSH rather than at every end of section.
#[test]
fn a_qemu10_destination_loads_the_pages_over_its_own_multifd_channels() {
    let hosts = Sides {
        qemu10: true,
        ..Sides::default()
    };
    migrate_into_destination_multifd("dest-multifd-10", "2", hosts);
}

/// A VM moving from QEMU 7.2 to an upgraded host's QEMU 10, which runs it with machine type
/// pc-i440fx-7.2 and so syncs its multifd channels at every end of section, as 7.2 does: the
/// machine type in the stream tells the destination shim so.
#[test]
fn a_qemu72_vm_moves_to_qemu10_through_the_shim_loading_over_multifd() {
    let hosts = Sides {
        dst_qemu10: true,
        ..Sides::default()
    };
    migrate_into_destination_multifd("qemu72-to-10", "2", hosts);
}

/// `--qemu-multifd` for a destination QEMU configured otherwise: the migration fails with the
/// reason named, the source runs on, nothing hangs.
fn refused_destination_multifd(name: &str, dst_caps: &[(&str, bool)], channels: u32, says: &str) {
    let s = setup_sides(
        name,
        &[],
        json!({}),
        2000,
        Sides {
            recv_args: &["--qemu-multifd", "2"],
            dst_caps,
            dst_params: Some(json!({ "multifd-channels": channels })),
            ..Sides::default()
        },
    );
    fails_with_the_reason(s, says);
}

/// Migrates `s`, which must fail: the source QEMU reports it and runs on, the destination shim
/// exits and says `says`.
fn fails_with_the_reason(mut s: Setup, says: &str) {
    let src_sock = s.scratch.0.join("src.sock");
    s.src
        .migrate(&format!("unix:{}", src_sock.display()))
        .unwrap();
    let info = s
        .src
        .wait_migration(Duration::from_secs(90))
        .expect("no hang on the source");
    assert_eq!(info["status"], "failed", "{info}\n{}", log(&s, "recv.log"));
    assert_eq!(s.src.status().unwrap(), "running");
    let dir = s.scratch.0.clone();
    let status = wait_exit(&mut s.recv, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "shim still runs: {}\nsource shim: {}\nsource QEMU: {info}",
            read_log(&dir, "recv.log"),
            read_log(&dir, "send.log")
        )
    });
    let text = read_log(&dir, "recv.log");
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(says),
        "{text}\nsource shim: {}",
        read_log(&dir, "send.log")
    );
}

#[test]
fn qemu_multifd_for_a_destination_without_multifd_is_refused() {
    refused_destination_multifd(
        "dest-multifd-off",
        &[],
        2,
        "is its `multifd` capability on, with `multifd-channels` 2?",
    );
}

#[test]
fn qemu_multifd_for_a_source_that_uses_multifd_itself_is_refused() {
    // Both QEMUs with multifd: the source's channels would go to the destination QEMU opaque,
    // beside the shim's own: the destination shim refuses the session and says why.
    let caps = [("multifd", true)];
    let s = setup_sides(
        "dest-multifd-both",
        &caps,
        json!({ "multifd-channels": 2 }),
        2000,
        Sides {
            recv_args: &["--qemu-multifd", "2"],
            ..Sides::default()
        },
    );
    fails_with_the_reason(s, "the source QEMU migrates with multifd itself");
}

#[test]
fn qemu_multifd_for_a_destination_expecting_more_channels_is_refused() {
    refused_destination_multifd(
        "dest-multifd-more",
        &[("multifd", true)],
        3,
        "its `multifd-channels` must equal --qemu-multifd 2",
    );
}

/// Which shim a test kills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Victim {
    Source,
    Destination,
}

/// Kills one shim once data flows; the source QEMU must report a failed migration and run on,
/// the other shim must report the failure and exit, the destination QEMU must stop waiting.
fn kill_mid_migration(name: &str, send_args: &[&str], victim: Victim) {
    let mut s = setup_with(name, &[], json!({}), send_args, 2000);
    let src_sock = s.scratch.0.join("src.sock");
    s.src
        .migrate(&format!("unix:{}", src_sock.display()))
        .unwrap();
    wait_under_way(&mut s.src, 4 << 20);
    let (killed, survivor, survivor_log) = match victim {
        Victim::Source => (&mut s.send, &mut s.recv, "recv.log"),
        Victim::Destination => (&mut s.recv, &mut s.send, "send.log"),
    };
    let _ = killed.0.kill();
    let info = s
        .src
        .wait_migration(Duration::from_secs(30))
        .expect("no hang on the source");
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(
        s.src.status().unwrap(),
        "running",
        "the source VM must keep running"
    );
    let ticks = s
        .src
        .console_text()
        .matches("pagestream-workload tick")
        .count();
    s.src
        .wait_console(
            "pagestream-workload tick",
            ticks + 2,
            Duration::from_secs(30),
        )
        .unwrap();
    let dir = s.scratch.0.clone();
    let status = wait_exit(survivor, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "the other shim still runs: {}",
            read_log(&dir, survivor_log)
        )
    });
    let text = read_log(&dir, survivor_log);
    assert!(!status.success(), "{text}");
    assert!(text.contains("FAILED"), "{text}");
    assert!(
        s.dst.wait_exit(Duration::from_secs(30)),
        "the destination QEMU still waits"
    );
}

#[test]
fn a_killed_source_shim_fails_the_migration_and_the_source_runs_on() {
    kill_mid_migration("killed-src", &[], Victim::Source);
}

#[test]
fn a_killed_destination_shim_fails_the_migration_and_the_source_runs_on() {
    kill_mid_migration("killed-dst", &[], Victim::Destination);
}

#[test]
fn a_killed_shim_in_opaque_mode_fails_the_migration_too() {
    kill_mid_migration("killed-opaque", &["--mode", "opaque"], Victim::Source);
}

/// A shim in the network namespace `ns`, logging to `log`.
fn shim_in(ns: &str, args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_pagestream"),
                "shim",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ip netns exec runs"),
    )
}

/// What goes silent mid-migration.
#[derive(Clone, Copy, PartialEq)]
enum Silence {
    /// The link: every packet dropped, no reset to either end.
    Link,
    /// The destination shim: stopped (SIGSTOP), its kernel still acknowledging until its
    /// receive buffers are full, and answering probes with its window closed.
    DestinationShim,
}

/// Makes the link or the destination shim go silent mid-migration: the source shim must give
/// up after `--link-timeout`, the source QEMU report a failed migration and run on; the
/// destination shim (resumed, if it was stopped) must fail too, and the destination QEMU stop
/// waiting. Without the kernel's liveness checks on the shims' sockets, both sides would wait
/// for ever.
fn silence_mid_migration(name: &str, send_args: &[&str], silence: Silence) {
    const LINK_TIMEOUT_S: u64 = 5;
    let pair = LinkPair::create(20_000_000, 64 << 10).expect("two network namespaces (root)");
    let guest = Guest::locate(&workspace()).expect("test guest (scripts/build-guest.sh)");
    let scratch = Scratch::new(name);
    let dir = scratch.0.clone();
    let (dst_sock, src_sock, key) = (dir.join("dst.sock"), dir.join("src.sock"), dir.join("key"));
    std::fs::write(&key, "a partitioned pair of pagestream shims\n").unwrap();
    let mut dst = vm(&guest, &dir, "dst", Some("defer"), 2000);
    dst.migrate_incoming(&format!("unix:{}", dst_sock.display()))
        .unwrap();
    let (to, timeout) = (
        format!("{}:4444", pair.dst_addr),
        LINK_TIMEOUT_S.to_string(),
    );
    let (qemu, key) = (
        format!("unix:{}", dst_sock.display()),
        key.display().to_string(),
    );
    let (send_json, recv_json) = (
        dir.join("send.json").display().to_string(),
        dir.join("recv.json").display().to_string(),
    );
    let common = ["--once", "--key-file", &key, "--link-timeout", &timeout];
    let recv_args = [
        &[
            "recv",
            "--listen",
            &to,
            "--qemu",
            &qemu,
            "--summary-json",
            &recv_json,
        ][..],
        &common,
    ]
    .concat();
    let mut recv = shim_in(pair.dst_ns(), &recv_args, &dir.join("recv.log"));
    let listen = format!("unix:{}", src_sock.display());
    let send_args = [
        &[
            "send",
            "--listen",
            &listen,
            "--to",
            &to,
            "--summary-json",
            &send_json,
        ][..],
        &common,
        send_args,
    ]
    .concat();
    let mut send = shim_in(pair.src_ns(), &send_args, &dir.join("send.log"));
    wait_listening(&src_sock);
    let mut src = start_migrating(&guest, &dir, &src_sock);
    wait_under_way(&mut src, 4 << 20);
    let signal = |p: &Proc, sig: &str| {
        let sent = Command::new("kill")
            .args([sig, &p.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {sig} failed");
    };
    match silence {
        Silence::Link => pair.partition().unwrap(),
        Silence::DestinationShim => signal(&recv, "-STOP"),
    }
    let info = src
        .wait_migration(Duration::from_secs(60))
        .expect("no hang on the source");
    if silence == Silence::DestinationShim {
        signal(&recv, "-CONT");
    }
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(
        src.status().unwrap(),
        "running",
        "the source VM must keep running"
    );
    let ticks = src
        .console_text()
        .matches("pagestream-workload tick")
        .count();
    src.wait_console(
        "pagestream-workload tick",
        ticks + 2,
        Duration::from_secs(30),
    )
    .unwrap();
    for (p, name, json, side) in [
        (&mut send, "send.log", "send.json", "source shim"),
        (&mut recv, "recv.log", "recv.json", "destination shim"),
    ] {
        let status = wait_exit(p, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("a shim still waits: {}", read_log(&dir, name)));
        let text = read_log(&dir, name);
        assert!(!status.success(), "{text}");
        assert!(text.contains("FAILED"), "{text}");
        let summary = json_summary(&dir, json, side);
        assert_eq!(summary["completed"], false, "{summary}");
    }
    assert!(
        dst.wait_exit(Duration::from_secs(30)),
        "the destination QEMU still waits"
    );
}

#[test]
fn a_network_partition_fails_the_migration_and_the_source_runs_on() {
    silence_mid_migration("partition", &[], Silence::Link);
}

#[test]
fn a_network_partition_in_opaque_mode_fails_the_migration_too() {
    silence_mid_migration("partition-opaque", &["--mode", "opaque"], Silence::Link);
}

#[test]
fn a_stopped_destination_shim_in_opaque_mode_fails_the_migration_too() {
    silence_mid_migration(
        "stopped-opaque",
        &["--mode", "opaque"],
        Silence::DestinationShim,
    );
}

/// A destination QEMU that refuses the stream (its RAM is not the source's size): the migration
/// fails on both QEMUs, the source runs on, and the destination shim says that its QEMU closed
/// the migration connection, not just that some socket broke.
#[test]
fn a_destination_qemu_that_refuses_the_stream_is_named_as_the_cause() {
    let guest = Guest::locate(&workspace()).expect("test guest (scripts/build-guest.sh)");
    let scratch = Scratch::new("refused");
    let dir = scratch.0.clone();
    let (dst_sock, src_sock) = (dir.join("dst.sock"), dir.join("src.sock"));
    let port = free_port();
    let mut dst = QemuVm::start(
        &guest,
        &VmConfig {
            name: "dst".into(),
            dir: dir.clone(),
            memory_mib: MEMORY_MIB / 2,
            fill_mib: 48,
            dirty_rate: 2000,
            incoming: Some(format!("unix:{}", dst_sock.display())),
            paused: true,
            netns: None,
            prealloc: false,
            qemu: QemuBuild::System,
            machine: None,
            cpus: 1,
            devices: Vec::new(),
        },
    )
    .expect("QEMU starts");
    let (mut recv, mut send) = shims(&dir, port, &[], &[], true);
    let mut src = start_migrating(&guest, &dir, &src_sock);
    let info = src
        .wait_migration(Duration::from_secs(60))
        .expect("no hang on the source");
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(src.status().unwrap(), "running");
    for (p, name) in [(&mut recv, "recv.log"), (&mut send, "send.log")] {
        let status = wait_exit(p, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("shim still runs: {}", read_log(&dir, name)));
        assert!(!status.success(), "{}", read_log(&dir, name));
    }
    let text = read_log(&dir, "recv.log");
    assert!(text.contains("FAILED"), "{text}");
    assert!(
        text.contains("the destination QEMU closed the migration connection"),
        "{text}"
    );
    assert!(
        dst.wait_exit(Duration::from_secs(30)),
        "destination QEMU still runs"
    );
}

/// An operator cancels a migration midway (QMP `migrate_cancel`, what `virsh domjobabort`
/// sends): the source QEMU reports it cancelled and its VM runs on, the destination QEMU gives
/// up, both shims report the migration failed and stay up, and the next migration, into a new
/// destination QEMU, goes through the same shims with bit-identical memory.
#[test]
fn a_cancelled_migration_ends_on_both_sides_and_the_shims_carry_the_next_one() {
    let sides = Sides {
        stay_up: true,
        ..Sides::default()
    };
    let mut s = setup_sides("cancel", &[], json!({}), 2000, sides);
    let dir = s.scratch.0.clone();
    let src_uri = format!("unix:{}", dir.join("src.sock").display());
    cancel_midway(&mut s, &src_uri);
    assert_eq!(
        s.send.0.try_wait().unwrap(),
        None,
        "the source shim stays up"
    );
    assert_eq!(
        s.recv.0.try_wait().unwrap(),
        None,
        "the destination shim stays up"
    );

    // The next attempt, into a new destination QEMU on the same socket.
    let guest = Guest::locate(&workspace()).unwrap();
    let mut dst = vm(&guest, &dir, "dst2", Some("defer"), 2000);
    dst.migrate_incoming(&format!("unix:{}", dir.join("dst.sock").display()))
        .unwrap();
    s.src.migrate(&src_uri).unwrap();
    let info = s.src.wait_migration(Duration::from_secs(180)).unwrap();
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsend: {}\nrecv: {}",
        read_log(&dir, "send.log"),
        read_log(&dir, "recv.log")
    );
    wait_loaded(&mut dst);
    let a = memory(&mut s.src, &dir.join("src.mem"));
    let b = memory(&mut dst, &dir.join("dst.mem"));
    check_identical(&a, &b, "between source and destination").unwrap();
    for json in ["send.json", "recv.json"] {
        let summaries = json_summaries(&dir.join(json), 2);
        assert_eq!(summaries.len(), 2, "{json}: {summaries:?}");
        let next = &summaries[1];
        assert_eq!(next["completed"], true, "{next}");
        assert_eq!(next["verified_streams"], next["qemu_connections"], "{next}");
        assert_ne!(
            next["session"], summaries[0]["session"],
            "a session of its own"
        );
    }
}

/// Starts a migration to `src_uri`, cancels it once 16 MiB are under way, and checks what the
/// user sees: the source reports it cancelled and runs on, the destination QEMU gives up, and
/// both shims report the migration failed because it was cancelled at the source.
fn cancel_midway(s: &mut Setup, src_uri: &str) {
    let dir = s.scratch.0.clone();
    s.src.migrate(src_uri).unwrap();
    wait_under_way(&mut s.src, 16 << 20);
    s.src.qmp.execute("migrate_cancel", json!({})).unwrap();
    let info = s.src.wait_migration(Duration::from_secs(60)).unwrap();
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_eq!(s.src.status().unwrap(), "running", "the source VM runs on");
    assert!(
        s.dst.wait_exit(Duration::from_secs(30)),
        "the destination QEMU gives up on the cancelled migration\nrecv: {}",
        read_log(&dir, "recv.log")
    );
    for (json, side, log) in [
        ("send.json", "source shim", "send.log"),
        ("recv.json", "destination shim", "recv.log"),
    ] {
        let summaries = json_summaries(&dir.join(json), 1);
        assert_eq!(summaries.len(), 1, "{side}: {}", read_log(&dir, log));
        assert_eq!(summaries[0]["side"], side);
        assert_eq!(summaries[0]["completed"], false, "{}", summaries[0]);
        // Every byte QEMU wrote was carried: the shims fail the migration for what it was.
        let error = summaries[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the migration was cancelled or failed at the source"),
            "{side}: {error}"
        );
        assert!(
            read_log(&dir, log).contains("FAILED"),
            "{side}: {}",
            read_log(&dir, log)
        );
    }
}

/// The same cancel into a destination QEMU that loads the pages over multifd channels its shim
/// feeds (`--qemu-multifd`). The source QEMU's stream stops inside a page record; the
/// destination shim once took that cut record for a stream the parser had stopped following,
/// failed the migration for "the destination QEMU's multifd channels cannot be given their
/// barriers" and told the user to turn multifd off.
#[test]
fn a_cancelled_migration_into_a_destination_loading_over_multifd_is_reported_cancelled() {
    let sides = Sides {
        recv_args: &["--qemu-multifd", "2"],
        dst_caps: &[("multifd", true)],
        dst_params: Some(json!({ "multifd-channels": 2, "multifd-compression": "none" })),
        ..Sides::default()
    };
    let mut s = setup_sides("cancel-dest-multifd", &[], json!({}), 2000, sides);
    let src_uri = format!("unix:{}", s.scratch.0.join("src.sock").display());
    cancel_midway(&mut s, &src_uri);
    let recv = read_log(&s.scratch.0, "recv.log");
    assert!(!recv.contains("cannot be given their barriers"), "{recv}");
}

/// A migration cancelled midway in opaque mode, which the shims do not follow: both report it
/// failed because the stream's last bytes are not the end of a migration (`stream_end.rs`).
/// With the return path on, the destination QEMU's own word says so too (its return path ends
/// without the SHUT message that says it loaded everything).
#[test]
fn a_cancelled_migration_in_opaque_mode_is_failed_by_the_streams_end() {
    cancelled_in_opaque_mode("cancel-opaque", false, false);
}

#[test]
fn a_cancelled_migration_in_opaque_mode_is_failed_by_the_destinations_return_path_too() {
    cancelled_in_opaque_mode("cancel-opaque-rp", true, false);
}

#[test]
fn a_cancelled_qemu10_migration_in_opaque_mode_is_failed_by_the_streams_end() {
    cancelled_in_opaque_mode("cancel-opaque-10", false, true);
}

fn cancelled_in_opaque_mode(name: &str, return_path: bool, qemu10: bool) {
    let sides = Sides {
        send_args: &["--mode", "opaque"],
        qemu10,
        ..Sides::default()
    };
    let mut s = setup_sides(
        name,
        &[("return-path", return_path)],
        json!({}),
        2000,
        sides,
    );
    let dir = s.scratch.0.clone();
    s.src
        .migrate(&format!("unix:{}", dir.join("src.sock").display()))
        .unwrap();
    wait_under_way(&mut s.src, 16 << 20);
    s.src.qmp.execute("migrate_cancel", json!({})).unwrap();
    let info = s.src.wait_migration(Duration::from_secs(60)).unwrap();
    // QEMU 7.2 with the return path sometimes reports its own cancel as failed ("Unable to
    // write to socket: Broken pipe": its migration thread writing on the socket the cancel has
    // just shut down). It does so without the shims too: 1 of 6 native migrations cancelled
    // the same way.
    let status = info["status"].as_str().unwrap_or_default();
    assert!(
        status == "cancelled"
            || (status == "failed"
                && info["error-desc"] == "Unable to write to socket: Broken pipe"),
        "{info}\nsend: {}\nrecv: {}",
        read_log(&dir, "send.log"),
        read_log(&dir, "recv.log")
    );
    assert_eq!(s.src.status().unwrap(), "running", "the source VM runs on");
    for (p, json, side, log) in [
        (&mut s.send, "send.json", "source shim", "send.log"),
        (&mut s.recv, "recv.json", "destination shim", "recv.log"),
    ] {
        let status = wait_exit(p, Duration::from_secs(30)).expect("shim exits after --once");
        let text = read_log(&dir, log);
        assert!(!status.success(), "{side} fails the migration: {text}");
        let summary = json_summary(&dir, json, side);
        assert_eq!(summary["completed"], false, "{summary}");
        assert_eq!(summary["source_finished"], false, "{summary}");
        let loaded = if return_path {
            json!(false)
        } else {
            json!(null)
        };
        assert_eq!(summary["destination_loaded"], loaded, "{summary}");
        let error = summary["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("ended its migration stream midway"),
            "{side}: {error}"
        );
        assert!(text.contains("FAILED"), "{side}: {text}");
    }
}

/// Gives `vm` TLS credentials `tls0` from `certs`, as `endpoint` ("server" or "client"): the
/// destination checks the source's client certificate too.
fn add_tls_credentials(vm: &mut QemuVm, certs: &Path, endpoint: &str) {
    vm.qmp
        .execute(
            "object-add",
            json!({
                "qom-type": "tls-creds-x509",
                "id": "tls0",
                "dir": certs.display().to_string(),
                "endpoint": endpoint,
                "verify-peer": true,
            }),
        )
        .unwrap();
}

/// QEMU's own TLS: the shims see only encrypted bytes, tell the channels apart by the order
/// they come, and carry each opaque; the two QEMUs authenticate each other through them.
#[test]
fn a_tls_migration_is_carried_opaque() {
    let sides = Sides {
        tls: true,
        ..Sides::default()
    };
    let s = setup_sides("tls", &[("return-path", true)], json!({}), 2000, sides);
    migrate_and_verify(s, &[OPAQUE, "QEMU's TLS encrypts the stream"], &[OPAQUE]);
}

/// The same with multifd: QEMU opens its channels only once the main channel's handshake is
/// done, each encrypted too; the destination QEMU reads their ids inside TLS.
#[test]
fn a_tls_migration_with_multifd_is_carried_opaque() {
    tls_migration_with_multifd("tls-multifd", false);
}

/// QEMU 10 under TLS with multifd: its source ends every multifd channel's TLS session with a
/// close_notify once the migration completed (QEMU 7.2 did not), which may reach a destination
/// QEMU that has closed the channel already.
#[test]
fn a_qemu10_tls_migration_with_multifd_is_carried_opaque() {
    tls_migration_with_multifd("qemu10-tls-multifd", true);
}

/// A TLS migration with two multifd channels, between QEMU 7.2s or QEMU 10s, carried opaque.
fn tls_migration_with_multifd(name: &str, qemu10: bool) {
    let sides = Sides {
        tls: true,
        qemu10,
        ..Sides::default()
    };
    let s = setup_sides(
        name,
        &[("multifd", true)],
        json!({ "multifd-channels": 2 }),
        2000,
        sides,
    );
    let says = &[
        OPAQUE,
        "QEMU's TLS encrypts the stream",
        "3 QEMU connection(s)",
    ];
    migrate_and_verify(s, says, &[OPAQUE, "3 QEMU connection(s)"]);
}

/// `pagestream bench shim`: records a live migration of the test guest to a file, then replays
/// it through the shims on loopback and over an emulated link, every run verified against the
/// recording (memory and device state as the loader ends with them).
#[test]
fn bench_shim_replays_a_recorded_migration_verified() {
    let scratch = Scratch::new("bench-shim");
    let recording = scratch.0.join("guest.stream");
    let bench = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_pagestream"))
            .current_dir(workspace())
            .args(["bench", "shim", "--repeat", "1", "--json"])
            .args(args)
            .output()
            .expect("pagestream runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bench shim {args:?} failed: {stderr}");
        serde_json::from_slice(&out.stdout).expect("one JSON report")
    };
    let record = recording.to_str().unwrap();
    // A small guest: the replays keep both CPUs busy, beside the tests that run alongside.
    let report = bench(&["--record", record, "--mem", "128", "--fill", "32"]);
    let stream_bytes = std::fs::metadata(&recording).unwrap().len();
    assert_eq!(report["stream_bytes"], stream_bytes, "{report}");
    // The workload's 32 MiB, in pages of their own.
    assert!(stream_bytes > 32 << 20, "{report}");
    assert!(report["page_records"].as_u64().unwrap() > 8192, "{report}");
    // Guest RAM and the firmware's and devices' blocks.
    assert!(
        report["ram_bytes"].as_u64().unwrap() >> 20 >= 128,
        "{report}"
    );
    assert_eq!(report["verified"], true, "{report}");
    let runs = report["runs"].as_array().unwrap();
    let methods: Vec<&str> = runs.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["tcp", "shim", "shim-opaque"], "{report}");
    for run in runs {
        assert_eq!(run["verified"], true, "{run}");
        assert!(run["note"].is_null(), "{run}");
        assert!(run["seconds"].as_f64().unwrap() > 0.0, "{run}");
    }
    assert_eq!(runs[0]["wire_bytes"], stream_bytes);
    assert!(
        runs[1]["mode"].as_str().unwrap().starts_with("parsing"),
        "{report}"
    );
    assert!(
        runs[2]["mode"].as_str().unwrap().starts_with("opaque"),
        "{report}"
    );
    // Opaque mode's LZ4 shrinks the workload's content.
    assert!(
        runs[2]["wire_bytes"].as_u64().unwrap() < stream_bytes,
        "{report}"
    );

    let report = bench(&["--stream", record, "--link", "1gbit", "--methods", "shim"]);
    assert_eq!(report["link_mb_s"], 125.0, "{report}");
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["runs"].as_array().unwrap().len(), 1, "{report}");
}

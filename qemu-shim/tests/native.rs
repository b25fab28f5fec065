//! The method every shim test relies on, checked with QEMU alone: a busy guest migrated live to
//! a paused destination, over several passes, ends with bit-identical memory on both sides.
//!
//! This holds on QEMU 7.2 under TCG only with the harness's RAM padding (see
//! `vm::TCG_TRACKING_PAD`): without it this very migration leaves a few dozen stale pages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pagestream_qemu_shim::vm::{Guest, QemuBuild, QemuVm, VmConfig, check_identical, ram_bytes};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn native_migration_gives_identical_memory() {
    let guest = Guest::locate(&workspace()).expect("test guest");
    let dir = std::env::temp_dir().join(format!("ps-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("incoming.sock");
    let config = |name: &str, incoming: Option<String>| VmConfig {
        name: name.into(),
        dir: dir.clone(),
        memory_mib: 256,
        fill_mib: 96,
        dirty_rate: 2000,
        incoming,
        paused: false,
        netns: None,
        prealloc: false,
        qemu: QemuBuild::System,
        machine: None,
        cpus: 1,
        devices: Vec::new(),
    };
    let mut src = QemuVm::start(&guest, &config("src", None)).unwrap();
    src.wait_console("pagestream-workload tick", 2, Duration::from_secs(60))
        .unwrap();
    let mut dst_config = config("dst", Some(format!("unix:{}", sock.display())));
    dst_config.paused = true;
    let mut dst = QemuVm::start(&guest, &dst_config).unwrap();
    // 30 MB/s: the copy takes several passes while the guest dirties pages.
    src.parameters(serde_json::json!({ "max-bandwidth": 30_000_000u64 }))
        .unwrap();
    src.migrate(&format!("unix:{}", sock.display())).unwrap();
    let info = src.wait_migration(Duration::from_secs(120)).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 3,
        "the migration must take several passes to show anything: {info}"
    );
    // "completed" on the source: everything is sent; wait until the destination has loaded it.
    assert_eq!(dst.wait_loaded(Duration::from_secs(60)).unwrap(), "paused");
    let ram = ram_bytes(256);
    let x = src.memory(&dir.join("src.mem"), ram).unwrap();
    let y = dst.memory(&dir.join("dst.mem"), ram).unwrap();
    check_identical(&x, &y, "after a native migration").unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// `prealloc` (the benchmark's `--prealloc-destination`) backs all guest memory when QEMU
/// starts: a destination waiting for a migration is already resident at the guest's size, where
/// one without it holds little more than QEMU itself.
#[test]
fn preallocated_memory_is_resident_before_the_migration() {
    let guest = Guest::locate(&workspace()).expect("test guest");
    let dir = std::env::temp_dir().join(format!("ps-prealloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let memory_mib = 256;
    let resident = |prealloc: bool| {
        let config = VmConfig {
            name: format!("dst-prealloc-{prealloc}"),
            dir: dir.clone(),
            memory_mib,
            fill_mib: 0,
            dirty_rate: 0,
            incoming: Some("defer".into()),
            paused: false,
            netns: None,
            prealloc,
            qemu: QemuBuild::System,
            machine: None,
            cpus: 1,
            devices: Vec::new(),
        };
        let vm = QemuVm::start(&guest, &config).unwrap();
        vm.resident_bytes().unwrap()
    };
    let guest_bytes = ram_bytes(memory_mib);
    let on_demand = resident(false);
    let preallocated = resident(true);
    assert!(
        preallocated >= guest_bytes,
        "with -mem-prealloc QEMU holds {preallocated} bytes, less than the guest's {guest_bytes}"
    );
    assert!(
        on_demand < guest_bytes / 2,
        "without it a waiting destination should hold little: {on_demand} bytes"
    );
    std::fs::remove_dir_all(&dir).ok();
}

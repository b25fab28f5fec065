//! The method every shim test relies on, checked with QEMU alone: a guest migrated to a paused
//! destination ends with bit-identical memory on both sides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pagestream_qemu_shim::vm::{Guest, QemuVm, VmConfig};

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
        dirty_rate: 500,
        incoming,
        paused: false,
        netns: None,
    };
    let mut src = QemuVm::start(&guest, &config("src", None)).unwrap();
    src.wait_console("pagestream-workload tick", 2, Duration::from_secs(60))
        .unwrap();
    let mut dst_config = config("dst", Some(format!("unix:{}", sock.display())));
    dst_config.paused = true;
    let mut dst = QemuVm::start(&guest, &dst_config).unwrap();
    src.parameters(serde_json::json!({ "max-bandwidth": 1u64 << 40 }))
        .unwrap();
    src.migrate(&format!("unix:{}", sock.display())).unwrap();
    let info = src.wait_migration(Duration::from_secs(120)).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    let (a, b) = (dir.join("src.mem"), dir.join("dst.mem"));
    src.pmemsave(&a, 256 << 20).unwrap();
    dst.pmemsave(&b, 256 << 20).unwrap();
    // pmemsave returns before the file is complete only in name: wait for both.
    for f in [&a, &b] {
        for _ in 0..100 {
            if std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) == 256 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "memory differs"
    );
    std::fs::remove_dir_all(&dir).ok();
}

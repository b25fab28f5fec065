//! The stream parser against a real QEMU 7.2 migration: a live migration saved to a file is
//! parsed, its pages are counted against QEMU's own statistics, the stream is rebuilt the way
//! the destination shim rebuilds it, and a paused destination QEMU loads the rebuilt stream to
//! bit-identical memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pagestream_qemu_shim::stream::{Event, Parser, RamBlock, write_page_record};
use pagestream_qemu_shim::vm::{Guest, QemuBuild, QemuVm, VmConfig, check_identical, ram_bytes};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Rebuilt {
    stream: Vec<u8>,
    blocks: Vec<RamBlock>,
    pages: u64,
    fills: u64,
    /// RAM end-of-section markers.
    sections_ended: u64,
    pass_through: Option<(String, bool)>,
}

fn parse_and_rebuild(stream: &[u8]) -> Rebuilt {
    let mut parser = Parser::new();
    let mut out = Rebuilt {
        stream: Vec::with_capacity(stream.len() + (8 << 20)),
        blocks: Vec::new(),
        pages: 0,
        fills: 0,
        sections_ended: 0,
        pass_through: None,
    };
    let mut held = Vec::new();
    let mut emit = |event: Event<'_>| match event {
        Event::Bytes(b) => out.stream.extend_from_slice(b),
        Event::RamBlocks(list) => out.blocks = list.to_vec(),
        Event::Page {
            block,
            offset,
            data,
            ..
        } => {
            out.pages += 1;
            write_page_record(&mut out.stream, &out.blocks[block].name, offset, Some(data));
        }
        Event::Fill { block, offset, .. } => {
            out.fills += 1;
            write_page_record(&mut out.stream, &out.blocks[block].name, offset, None);
        }
        Event::RamSectionEnd => out.sections_ended += 1,
        Event::PassThrough {
            reason, expected, ..
        } => out.pass_through = Some((reason, expected)),
    };
    // Feed it the way a socket would: in uneven pieces.
    for piece in stream.chunks(100_003) {
        held.extend_from_slice(piece);
        parser.parse_all(&mut held, &mut emit);
    }
    parser.finish(&held, &mut emit);
    out
}

#[test]
fn a_real_stream_parsed_and_rebuilt_loads_bit_identical() {
    let guest = Guest::locate(&workspace()).expect("test guest (scripts/build-guest.sh)");
    let dir = std::env::temp_dir().join(format!("ps-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = |name: &str, incoming: Option<String>| VmConfig {
        name: name.into(),
        dir: dir.clone(),
        memory_mib: 256,
        fill_mib: 48,
        dirty_rate: 2000,
        incoming: incoming.clone(),
        paused: incoming.is_some(),
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
    // 50 MB/s: several passes while the guest dirties pages.
    src.parameters(serde_json::json!({ "max-bandwidth": 50_000_000u64 }))
        .unwrap();
    let saved = dir.join("stream.bin");
    src.migrate(&format!("exec:cat > {}", saved.display()))
        .unwrap();
    let info = src.wait_migration(Duration::from_secs(120)).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 3,
        "the migration must take several passes: {info}"
    );

    let stream = std::fs::read(&saved).unwrap();
    let rebuilt = parse_and_rebuild(&stream);
    let (reason, expected) = rebuilt.pass_through.clone().expect("device state");
    assert!(expected, "the parser gave up early: {reason}");
    assert!(reason.contains("device state"), "{reason}");
    let pc_ram = rebuilt
        .blocks
        .iter()
        .find(|b| b.name == "pc.ram")
        .expect("pc.ram listed");
    assert_eq!(pc_ram.used_length, ram_bytes(256));
    // At least the START (after the block list) and the END section end with a marker.
    assert!(rebuilt.sections_ended >= 2, "{}", rebuilt.sections_ended);
    // QEMU counts the pages it sent whole ("normal") and as zero records ("duplicate").
    assert_eq!(
        rebuilt.pages,
        info["ram"]["normal"].as_u64().unwrap(),
        "{info}"
    );
    assert_eq!(
        rebuilt.fills,
        info["ram"]["duplicate"].as_u64().unwrap(),
        "{info}"
    );

    let replay = dir.join("rebuilt.bin");
    std::fs::write(&replay, &rebuilt.stream).unwrap();
    let mut dst = QemuVm::start(
        &guest,
        &config("dst", Some(format!("exec:cat {}", replay.display()))),
    )
    .unwrap();
    assert_eq!(
        dst.wait_loaded(Duration::from_secs(60)).unwrap(),
        "paused",
        "the destination did not load the rebuilt stream"
    );
    let ram = ram_bytes(256);
    let x = src.memory(&dir.join("src.mem"), ram).unwrap();
    let y = dst.memory(&dir.join("dst.mem"), ram).unwrap();
    check_identical(&x, &y, "after loading the rebuilt stream").unwrap();
    drop((src, dst));
    std::fs::remove_dir_all(&dir).ok();
}

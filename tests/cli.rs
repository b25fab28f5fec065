//! The `pagestream` command line, end to end: what a user types, what they get back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pagestream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagestream"))
        .args(args)
        .output()
        .expect("pagestream runs")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagestream-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn gen_image(dir: &Path, size: &str, mix: &str) -> PathBuf {
    let path = dir.join(format!("{size}-{}.img", mix.len()));
    let out = pagestream(&[
        "codec",
        "gen",
        "--size",
        size,
        "--mix",
        mix,
        "--seed",
        "3",
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    path
}

#[test]
fn codec_bench_json_reports_every_field_and_a_verified_round_trip() {
    let dir = scratch_dir("bench");
    let image = gen_image(
        &dir,
        "8M",
        "zero=30,text=20,ints=10,ptrs=10,code=10,random=10,dup=10",
    );
    let out = pagestream(&[
        "codec",
        "bench",
        "--image",
        image.to_str().unwrap(),
        "--json",
        "--repeat",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "pages",
        "raw_bytes",
        "wire_bytes",
        "ratio",
        "encode_mb_s",
        "decode_mb_s",
        "roundtrip_ok",
    ] {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    for baseline in ["zstd1", "lz4"] {
        for key in ["wire_bytes", "encode_mb_s", "decode_mb_s"] {
            assert!(
                report[baseline].get(key).is_some(),
                "missing {baseline}.{key}"
            );
        }
    }
    assert_eq!(report["pages"], 2048);
    assert_eq!(report["raw_bytes"], 8 << 20);
    assert_eq!(report["roundtrip_ok"], true);
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(wire < 8 << 20, "no compression at all: {wire}");
    // Pages by class add up to the image.
    let classes = report["classes"].as_object().unwrap();
    let total: u64 = classes.values().map(|c| c["pages"].as_u64().unwrap()).sum();
    assert_eq!(total, 2048);
    assert!(classes["zero"]["pages"].as_u64().unwrap() > 0);
    assert!(classes["duplicate"]["pages"].as_u64().unwrap() > 0);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn codec_bench_with_threads_and_a_ragged_image() {
    let dir = scratch_dir("ragged");
    let image = dir.join("ragged.img");
    // Not a whole number of pages: the last page is padded.
    let bytes: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, bytes).unwrap();
    let out = pagestream(&[
        "codec",
        "bench",
        "--image",
        image.to_str().unwrap(),
        "--json",
        "--repeat",
        "1",
        "--threads",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pages"], 10);
    assert_eq!(report["threads"], 3);
    assert_eq!(report["roundtrip_ok"], true);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failure_status() {
    let recv = |extra: &'static [&'static str]| -> Vec<&'static str> {
        let mut args = vec![
            "shim",
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--qemu",
            "unix:/nonexistent",
        ];
        args.extend_from_slice(extra);
        args
    };
    let send = |extra: &'static [&'static str]| -> Vec<&'static str> {
        let mut args = vec![
            "shim",
            "send",
            "--listen",
            "unix:/tmp/x.sock",
            "--to",
            "127.0.0.1:1",
        ];
        args.extend_from_slice(extra);
        args
    };
    let shim_cases: [(Vec<&str>, &str); 8] = [
        (send(&["--dup-cache", "lots"]), "bad --dup-cache"),
        (
            send(&["--dup-cache", "1G", "--delta-cache", "64M"]),
            "together they may take at most 1024 MiB",
        ),
        (
            send(&["--summary-json", "/nonexistent/dir/s.json"]),
            "cannot open --summary-json /nonexistent/dir/s.json",
        ),
        (
            send(&["--link-timeout", "0"]),
            "--link-timeout must be between 1 and 3600 seconds",
        ),
        (
            recv(&["--qemu-multifd", "0"]),
            "--qemu-multifd must be at least 1",
        ),
        (
            recv(&["--qemu-multifd", "2", "--qemu-uuid", "not-a-uuid"]),
            "8-4-4-4-12 hexadecimal digits",
        ),
        (
            recv(&["--qemu-uuid", "00112233-4455-6677-8899-aabbccddeeff"]),
            "--qemu-multifd",
        ),
        (recv(&["--qemu-multifd", "300"]), "--qemu-multifd"),
    ];
    let cases: [(&[&str], &str); 17] = [
        (
            &["bench", "shim", "--stream", "/nonexistent/stream"],
            "cannot read the stream /nonexistent/stream",
        ),
        // Not a migration stream: the loader cannot follow it.
        (
            &["bench", "shim", "--stream", "/etc/hostname"],
            "not a QEMU migration stream",
        ),
        (
            &["bench", "shim", "--methods", "tcp,carrier-pigeon"],
            "unknown method 'carrier-pigeon' (known: tcp, shim, shim-opaque)",
        ),
        (
            &[
                "bench",
                "shim",
                "--record",
                "/nonexistent/dir/s",
                "--mem",
                "256",
                "--fill",
                "64",
            ],
            "/nonexistent/dir is not a directory",
        ),
        (
            &["shim", "recv", "--listen", "127.0.0.1:0", "--qemu", "tcp:1"],
            "is not tcp:HOST:PORT",
        ),
        (
            &["bench", "qemu", "--repeat", "0"],
            "--repeat must be between 1 and 20",
        ),
        (
            &["bench", "qemu", "--time-limit", "0"],
            "--time-limit must be between 1 and 3600 seconds",
        ),
        (
            &["bench", "qemu", "--rtt", "5000"],
            "--rtt must be between 0 and 1000 milliseconds",
        ),
        (
            &["bench", "qemu", "--qemu", "9"],
            "--qemu 9: expected \"system\" or \"10\"",
        ),
        (
            &["codec", "bench", "--image", "/nonexistent/image"],
            "cannot read memory image",
        ),
        (
            &["codec", "gen", "--size", "12Q", "-o", "/tmp/x"],
            "unknown unit",
        ),
        (
            &["codec", "gen", "--mix", "zero=1,gold=2", "-o", "/tmp/x"],
            "unknown content kind 'gold'",
        ),
        (
            &["codec", "gen", "--size", "1M", "-o", "/nonexistent/dir/x"],
            "cannot write",
        ),
        (
            &["codec", "bench", "--image", "/dev/null", "--threads", "0"],
            "--threads",
        ),
        (&["demo", "--size", "1K"], "--size must be between"),
        (
            &["demo", "--inflight", "100K"],
            "--inflight must be between",
        ),
        (&["demo", "--inflight", "lots"], "bad --inflight 'lots'"),
    ];
    let all = cases.into_iter().chain(
        shim_cases
            .iter()
            .map(|(args, message)| (&args[..], *message)),
    );
    for (args, message) in all {
        let out = pagestream(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains(message),
            "{args:?}: expected '{message}' in: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn demo_migrates_and_verifies() {
    for (compression, classes) in [
        ("adaptive", &["zero", "unchanged", "delta"][..]),
        ("100", &["zero", "unchanged", "delta", "lz4"][..]),
        ("200", &["zero", "unchanged", "zstd"][..]),
    ] {
        let out = pagestream(&[
            "demo",
            "--size",
            "16M",
            "--channels",
            "2",
            "--compression",
            compression,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("verified: all 4096 destination pages are identical"),
            "{text}"
        );
        for class in classes {
            assert!(
                text.contains(class),
                "class {class} missing from the report: {text}"
            );
        }
    }
}

fn transport_report(args: &[&str]) -> serde_json::Value {
    let out = pagestream(args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "verified",
        "effective_mb_s",
        "wire_mb_s",
        "baseline_mb_s",
        "link_mb_s",
        "channels",
        "backend",
        "wire_bytes",
        "raw_bytes",
    ] {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    assert_eq!(report["verified"], true, "{report}");
    report
}

#[test]
fn bench_transport_over_loopback() {
    let report = transport_report(&[
        "bench",
        "transport",
        "--size",
        "8M",
        "--repeat",
        "1",
        "--channels",
        "3",
        "--inflight",
        "2M",
        "--json",
    ]);
    assert_eq!(report["link"], "loopback");
    assert!(report["link_mb_s"].is_null());
    assert_eq!(report["channels"], 3);
    assert_eq!(report["inflight_bytes"], 2 << 20);
    assert_eq!(report["runs_s"].as_array().map(Vec::len), Some(1));
    assert_eq!(report["baseline_runs_s"].as_array().map(Vec::len), Some(1));
    assert!(report["effective_mb_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_transport_over_an_emulated_gigabit_link() {
    // Needs root for network namespaces; CI runs as root. Without it the command must say so.
    let report = transport_report(&[
        "bench",
        "transport",
        "--size",
        "16M",
        "--repeat",
        "1",
        "--link",
        "1gbit",
        "--json",
    ]);
    assert_eq!(report["link_mb_s"], 125.0);
    let wire = report["wire_mb_s"].as_f64().unwrap();
    assert!(
        wire > 0.0 && wire < 126.0,
        "wire rate {wire} MB/s over a 125 MB/s link"
    );
    // Everything it created is gone.
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip runs");
    let names = String::from_utf8_lossy(&list.stdout);
    assert!(!names.contains("psb-"), "namespaces left behind: {names}");
}

#[test]
fn bench_transport_rejects_bad_links() {
    for (args, message) in [
        (
            &["bench", "transport", "--link", "5qbit"][..],
            "unknown unit",
        ),
        (
            &["bench", "transport", "--link", "200gbit"][..],
            "out of range",
        ),
        (
            &["bench", "transport", "--compression", "201"][..],
            "--compression",
        ),
    ] {
        let out = pagestream(args);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
}

//! `deploy/check-deps.sh`, the check that the installer brings every package a run uses.
//!
//! The bug it exists for: etcd-client's build runs protoc on protos that import
//! `google/protobuf/descriptor.proto`, a file only `libprotobuf-dev` has, and the installer
//! did not list it. Here protoc really compiles such a proto while fatrace records, and the
//! check must pass with the real installer and fail, naming the package, without that line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use roost_tests::TempRoot;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Run protoc as etcd-client's build does, with fatrace recording; return the trace's path.
/// fanotify marks take a moment to set up, so a trace that missed protoc is taken again.
fn trace_protoc(dir: &Path) -> PathBuf {
    let proto = dir.join("uses_descriptor.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
         message M { google.protobuf.FileDescriptorProto d = 1; }\n",
    )
    .unwrap();
    for attempt in 0..3 {
        let trace = dir.join(format!("trace-{attempt}"));
        let mut fatrace = Command::new("fatrace")
            .args(["--filter=O", "--output"])
            .arg(&trace)
            .stdin(Stdio::null())
            .spawn()
            .expect("run fatrace (deploy/install-deps.sh installs it)");
        std::thread::sleep(Duration::from_millis(500 + 500 * attempt));
        let out = Command::new("protoc")
            .arg("-I")
            .arg(dir)
            .args(["--include_imports", "--descriptor_set_out=/dev/null"])
            .arg(&proto)
            .output()
            .expect("run protoc");
        assert!(
            out.status.success(),
            "protoc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SIGINT: fatrace flushes what it recorded and exits.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(fatrace.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        fatrace.wait().unwrap();
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        if text.contains("/usr/include/google/protobuf/descriptor.proto") {
            // fanotify sees the whole machine; keep protoc's lines only, so whatever else runs
            // meanwhile (another test, an apt run on a developer's machine) can't decide this test.
            let protoc_only: String = text
                .lines()
                .filter(|l| l.starts_with("protoc("))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&trace, protoc_only).unwrap();
            return trace;
        }
    }
    panic!("fatrace never recorded protoc opening descriptor.proto in 3 tries");
}

fn check(trace: &Path, installer: &Path) -> Output {
    Command::new(repo().join("deploy/check-deps.sh"))
        .arg(trace)
        .arg(installer)
        .output()
        .expect("run deploy/check-deps.sh")
}

#[test]
fn the_package_check_passes_with_the_installer_and_fails_without_libprotobuf_dev() {
    let root = TempRoot::new("check-deps");
    let trace = trace_protoc(root.path());

    let installer = repo().join("deploy/install-deps.sh");
    let with = check(&trace, &installer);
    assert!(
        with.status.success(),
        "check failed with the real installer: {}",
        String::from_utf8_lossy(&with.stderr)
    );

    let text = std::fs::read_to_string(&installer).unwrap();
    let dropped: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("libprotobuf-dev"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        dropped, text,
        "the installer has no libprotobuf-dev line to drop"
    );
    let without = root.path().join("install-deps-without-libprotobuf-dev.sh");
    std::fs::write(&without, dropped).unwrap();
    let out = check(&trace, &without);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check passed without libprotobuf-dev: {stderr}"
    );
    assert!(
        stderr.contains("libprotobuf-dev")
            && stderr.contains("/usr/include/google/protobuf/descriptor.proto"),
        "the refusal does not name the package and the file: {stderr}"
    );
}

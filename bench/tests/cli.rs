//! The driver refuses to start, with a message saying what to do, when
//! something it needs is missing (checked before anything is installed or run).

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bench"))
}

fn run(command: &mut Command) -> (i32, String) {
    let output = command.output().expect("run bench");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_missing_kvmfork_binary_names_the_build_command() {
    let out = tempfile::tempdir().unwrap();
    let (code, stderr) = run(bench()
        .args(["--kvmfork", "/nonexistent/kvmfork", "--out-dir"])
        .arg(out.path()));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("cargo build --release -p kvmfork"),
        "{stderr}"
    );
    assert!(!out.path().join("benchmarks.md").exists());
}

#[test]
fn a_missing_template_names_the_template_build_command() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Any existing file stands in for kvmfork: the template check comes first.
    let (code, stderr) = run(bench()
        .args(["--kvmfork", "/bin/true", "--out-dir"])
        .arg(out.path())
        .env("KVMFORK_CACHE_DIR", cache.path()));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no Python template"), "{stderr}");
    assert!(stderr.contains("kvmfork template build"), "{stderr}");
    // A half-built template (no state.snap yet) does not count either.
    std::fs::create_dir_all(cache.path().join("templates/python-abc.tmp-1")).unwrap();
    std::fs::create_dir_all(cache.path().join("templates/python-def")).unwrap();
    let (code, stderr) = run(bench()
        .args(["--kvmfork", "/bin/true", "--out-dir"])
        .arg(out.path())
        .env("KVMFORK_CACHE_DIR", cache.path()));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no Python template"), "{stderr}");
}

#[test]
fn bad_counts_are_usage_errors() {
    for bad in ["0,16", "1,,2", "many"] {
        let (code, stderr) = run(bench().args(["--connections", bad]));
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--connections"), "{stderr}");
    }
}

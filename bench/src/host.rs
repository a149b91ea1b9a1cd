//! What the table header says about the machine: CPU, cores, memory, kernel,
//! KVM kind, date, load, and which kvmfork commit was measured.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    /// `uname -r` as the kernel reports it.
    pub kernel: String,
    /// "PVM" or "hardware".
    pub kvm_kind: &'static str,
    /// RFC 3339, UTC, seconds.
    pub date: String,
    /// kvmfork commit (short hash, "+dirty" if the tree had changes).
    pub commit: String,
}

impl Host {
    pub fn probe(workspace: &Path) -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Host {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) as f64 / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            kvm_kind: kvm_kind(Path::new("/sys/module/kvm_pvm")),
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            commit: git_commit(workspace),
        }
    }
}

/// PVM exposes itself as the kvm_pvm module; anything else is hardware KVM.
pub fn kvm_kind(pvm_module: &Path) -> &'static str {
    if pvm_module.exists() {
        "PVM"
    } else {
        "hardware"
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// A `/proc/meminfo` field in KiB.
pub fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The 1-minute load average: the table notes how busy the shared machine was.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn git_commit(workspace: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            // Only the product's sources count: bench output files change on every run.
            let dirty = run(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "guest",
                "Cargo.lock",
                "Cargo.toml",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}+dirty")
            } else {
                hash
            }
        }
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_model_and_memory() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        let meminfo =
            "MemTotal:       24683520 kB\nMemFree:        1000 kB\nMemAvailable:   2000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(24_683_520));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(2000));
        assert_eq!(meminfo_kib(meminfo, "Mem"), None);
    }

    #[test]
    fn kvm_kind_follows_the_pvm_module() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kvm_kind(&dir.path().join("kvm_pvm")), "hardware");
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(kvm_kind(&dir.path().join("kvm_pvm")), "PVM");
    }
}

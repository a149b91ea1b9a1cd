//! Process-per-request peers measured in-process: spawn a command, wait for
//! it, check it printed "2". Latency is spawn to exit; throughput comes from
//! several spawner threads at once.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::BenchError;

/// A command line that must print exactly `expected_stdout` and exit 0.
#[derive(Debug, Clone)]
pub struct SpawnPeer {
    pub label: String,
    pub argv: Vec<String>,
    pub expected_stdout: String,
}

#[derive(Debug, Clone)]
pub struct SpawnResult {
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
    pub parallel: usize,
}

impl SpawnResult {
    pub fn per_second(&self) -> f64 {
        self.latency.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl SpawnPeer {
    /// `python3 -c CODE`.
    pub fn python(label: &str, python: &str, code: &str, expected: &str) -> SpawnPeer {
        SpawnPeer {
            label: label.into(),
            argv: vec![python.into(), "-c".into(), code.into()],
            expected_stdout: expected.into(),
        }
    }

    /// `python3 -c CODE` inside bubblewrap: read-only /usr, fresh /proc, /dev
    /// and /tmp, every namespace unshared (no network), killed with its parent.
    pub fn bubblewrap(
        label: &str,
        bwrap: &str,
        python: &str,
        code: &str,
        expected: &str,
    ) -> SpawnPeer {
        let argv: Vec<String> = [
            bwrap,
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--symlink",
            "usr/bin",
            "/bin",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            python,
            "-c",
            code,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // /etc is not bound: CPython starts without it, and nothing of the host leaks in.
        SpawnPeer {
            label: label.into(),
            argv,
            expected_stdout: expected.into(),
        }
    }

    /// Runs it once, returning how long spawn-to-exit took.
    pub fn run_once(&self) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let output = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| BenchError::Spawn {
                what: self.label.clone(),
                source,
            })?;
        let took = start.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || stdout != self.expected_stdout {
            return Err(BenchError::Probe {
                what: self.label.clone(),
                detail: format!(
                    "{:?} exited {} with stdout {stdout:?} (wanted {:?}), stderr {:?}",
                    self.argv,
                    output.status,
                    self.expected_stdout,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(took)
    }

    /// `iterations` runs spread over `parallel` threads, after `warmup` runs
    /// that fill the page cache and are not counted.
    pub fn measure(
        &self,
        iterations: usize,
        parallel: usize,
        warmup: usize,
    ) -> Result<SpawnResult, BenchError> {
        for _ in 0..warmup {
            self.run_once()?;
        }
        let remaining = AtomicUsize::new(iterations);
        let merged = Mutex::new(loadgen::stats::new_histogram());
        let first_error: Mutex<Option<BenchError>> = Mutex::new(None);
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..parallel.max(1) {
                scope.spawn(|| {
                    let mut local = loadgen::stats::new_histogram();
                    while remaining
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        match self.run_once() {
                            Ok(took) => {
                                let _ = local.record(loadgen::stats::micros(took));
                            }
                            Err(e) => {
                                first_error.lock().unwrap().get_or_insert(e);
                                remaining.store(0, Ordering::Relaxed);
                            }
                        }
                    }
                    merged
                        .lock()
                        .unwrap()
                        .add(&local)
                        .expect("same histogram bounds");
                });
            }
        });
        let elapsed = start.elapsed();
        if let Some(e) = first_error.into_inner().unwrap() {
            return Err(e);
        }
        Ok(SpawnResult {
            latency: merged.into_inner().unwrap(),
            elapsed,
            parallel: parallel.max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(label: &str, script: &str, expected: &str) -> SpawnPeer {
        SpawnPeer {
            label: label.into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            expected_stdout: expected.into(),
        }
    }

    #[test]
    fn measures_every_iteration_across_threads() {
        let peer = sh("echo", "echo 2", "2\n");
        let result = peer.measure(20, 3, 1).unwrap();
        assert_eq!(result.latency.len(), 20);
        assert_eq!(result.parallel, 3);
        assert!(result.per_second() > 0.0);
    }

    #[test]
    fn wrong_output_or_exit_status_fails_the_peer() {
        let err = sh("wrong", "echo 3", "2\n")
            .measure(5, 2, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong") && err.contains("\"3\\n\""), "{err}");
        assert!(sh("exit", "echo 2; exit 1", "2\n").run_once().is_err());
        let missing = SpawnPeer {
            label: "missing".into(),
            argv: vec!["/nonexistent/python3".into()],
            expected_stdout: String::new(),
        };
        assert!(matches!(missing.run_once(), Err(BenchError::Spawn { .. })));
    }

    #[test]
    fn latency_covers_the_whole_run() {
        let took = sh("sleep", "sleep 0.2; echo 2", "2\n").run_once().unwrap();
        assert!(took >= Duration::from_millis(200), "{took:?}");
    }
}

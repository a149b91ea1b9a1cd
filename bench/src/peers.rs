//! Starting the HTTP servers under test (kvmfork, the fork-per-request CPython
//! server, nginx) and installing the peers' Debian packages when missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Server};
use crate::BenchError;

const NGINX_CONF: &str = include_str!("../peers/nginx.conf.in");

/// A program the benchmark needs and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    pub path: &'static str,
    pub package: &'static str,
}

pub const BWRAP: Requirement = Requirement {
    path: "/usr/bin/bwrap",
    package: "bubblewrap",
};
pub const NGINX: Requirement = Requirement {
    path: "/usr/sbin/nginx",
    package: "nginx-light",
};
pub const FONT: Requirement = Requirement {
    path: "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    package: "fonts-dejavu-core",
};

/// Installs the missing ones with apt-get when running as root; otherwise
/// says which command to run.
pub fn ensure_installed(requirements: &[Requirement]) -> Result<(), BenchError> {
    let missing: Vec<&str> = requirements
        .iter()
        .filter(|r| !Path::new(r.path).exists())
        .map(|r| r.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::Install(format!(
            "missing {}; run as root or: sudo {command}",
            missing.join(", ")
        )));
    }
    eprintln!("bench: installing {}", missing.join(", "));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| BenchError::Install(format!("apt-get: {e}")))
    };
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    if !apt(&install)?.success() {
        // A fresh machine may have no package lists yet.
        apt(&["update", "-qq"])?;
        if !apt(&install)?.success() {
            return Err(BenchError::Install(format!("`{command}` failed")));
        }
    }
    if let Some(r) = requirements.iter().find(|r| !Path::new(r.path).exists()) {
        return Err(BenchError::Install(format!(
            "{} still missing after installing {}",
            r.path, r.package
        )));
    }
    Ok(())
}

/// The newest cached template of `language` (the rule `kvmfork` itself uses:
/// `$KVMFORK_CACHE_DIR` or `~/.cache/kvmfork`, `templates/<language>-*/state.snap`).
pub fn find_template(language: &str) -> Option<PathBuf> {
    find_template_in(&kvmfork_cache_dir(), language)
}

pub fn kvmfork_cache_dir() -> PathBuf {
    std::env::var_os("KVMFORK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/kvmfork")
        })
}

fn find_template_in(cache: &Path, language: &str) -> Option<PathBuf> {
    let prefix = format!("{language}-");
    std::fs::read_dir(cache.join("templates"))
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && !name.contains(".tmp-")
        })
        .filter_map(|e| {
            let modified = std::fs::metadata(e.path().join("state.snap"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((modified, e.path()))
        })
        .max()
        .map(|(_, path)| path)
}

pub const NUMPY: Requirement = Requirement {
    path: "/usr/lib/python3/dist-packages/numpy/__init__.py",
    package: "python3-numpy",
};
pub const NODE: Requirement = Requirement {
    path: "/usr/bin/node",
    package: "nodejs",
};

/// `kvmfork serve` with auth and rate limiting off and a queue deep enough that
/// 1000 connections wait instead of getting 503s.
pub fn start_kvmfork(
    kvmfork: &Path,
    template: &Path,
    workdir: &Path,
    queue_depth: usize,
) -> Result<(Server, Vec<String>), BenchError> {
    start_kvmfork_with(kvmfork, &[template], workdir, queue_depth, &[])
}

/// [`start_kvmfork`] serving every template in `templates` (one per
/// language), with `extra` serve flags.
pub fn start_kvmfork_with(
    kvmfork: &Path,
    templates: &[&Path],
    workdir: &Path,
    queue_depth: usize,
    extra: &[String],
) -> Result<(Server, Vec<String>), BenchError> {
    let addr = process::free_port()?;
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        addr.to_string(),
        "--rate-limit".into(),
        "0".into(),
        "--queue-depth".into(),
        queue_depth.to_string(),
    ];
    for template in templates {
        args.push("--template".into());
        args.push(template.display().to_string());
    }
    args.extend(extra.iter().cloned());
    let mut command = Command::new(kvmfork);
    // No keys file in an empty working directory and no $KVMFORK_API_KEYS_FILE: auth off.
    command
        .args(&args)
        .current_dir(workdir)
        .env_remove("KVMFORK_API_KEYS_FILE");
    let server = Server::start(
        "kvmfork serve",
        command,
        addr,
        "/v1/health",
        workdir.join("kvmfork-serve.log"),
        Duration::from_secs(300),
    )?;
    process::check_exec(&server)?;
    Ok((server, args))
}

/// bench/peers/fork_server.py: pre-forked CPython, one os.fork() per exec.
pub fn start_fork_server(
    python: &str,
    script: &Path,
    workers: usize,
    max_children: usize,
    preload: &[&str],
    workdir: &Path,
) -> Result<Server, BenchError> {
    let addr = process::free_port()?;
    let mut command = Command::new(python);
    command.arg(script).args([
        "--listen",
        &addr.to_string(),
        "--workers",
        &workers.to_string(),
    ]);
    command.args(["--max-children", &max_children.to_string()]);
    for module in preload {
        command.args(["--preload", module]);
    }
    let server = Server::start(
        "fork server",
        command,
        addr,
        "/v1/health",
        workdir.join("fork-server.log"),
        Duration::from_secs(60),
    )?;
    process::check_exec(&server)?;
    Ok(server)
}

/// bench/peers/node_fork_server.js: `spares` Node processes started ahead of
/// time, one per exec. Checked with `console.log(1+1)` before use.
pub fn start_node_fork_server(
    node: &str,
    script: &Path,
    spares: usize,
    workdir: &Path,
) -> Result<Server, BenchError> {
    let addr = process::free_port()?;
    let mut command = Command::new(node);
    command.arg(script).args([
        "--listen",
        &addr.to_string(),
        "--spares",
        &spares.to_string(),
    ]);
    let server = Server::start(
        "node fork server",
        command,
        addr,
        "/v1/health",
        workdir.join("node-fork-server.log"),
        Duration::from_secs(60),
    )?;
    let response = process::http_request(
        addr,
        "POST",
        "/v1/exec",
        Some(r#"{"code":"console.log(1+1)","language":"node"}"#),
    )
    .map_err(|e| BenchError::Probe {
        what: server.name.clone(),
        detail: e.to_string(),
    })?;
    crate::workloads::check_exec_response(response.status, &response.body, "2\n").map_err(
        |detail| BenchError::Probe {
            what: server.name.clone(),
            detail,
        },
    )?;
    Ok(server)
}

/// nginx `return 200` with `workers` worker processes, everything under `workdir`.
pub fn start_nginx(workdir: &Path, workers: usize) -> Result<Server, BenchError> {
    let addr = process::free_port()?;
    let dir = workdir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Write {
        path: dir.clone(),
        source,
    })?;
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, nginx_conf(&dir, addr, workers)).map_err(|source| {
        BenchError::Write {
            path: conf_path.clone(),
            source,
        }
    })?;
    let mut command = Command::new(NGINX.path);
    command
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path);
    let server = Server::start(
        "nginx",
        command,
        addr,
        "/v1/health",
        workdir.join("nginx.log"),
        Duration::from_secs(30),
    )?;
    // The port was free a moment ago; make sure the answer is really ours.
    let response =
        process::http_request(addr, "GET", "/v1/health", None).map_err(|e| BenchError::Probe {
            what: "nginx".into(),
            detail: e.to_string(),
        })?;
    if !response
        .header("server")
        .is_some_and(|s| s.starts_with("nginx"))
        || response.body != b"ok\n"
    {
        return Err(BenchError::Probe {
            what: "nginx".into(),
            detail: format!("unexpected answer {response:?}"),
        });
    }
    Ok(server)
}

fn nginx_conf(dir: &Path, addr: SocketAddr, workers: usize) -> String {
    NGINX_CONF
        .replace("@WORKERS@", &workers.to_string())
        .replace("@DIR@", &dir.display().to_string())
        .replace("@LISTEN@", &addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // These start the real peers: they need Debian's python3, nginx-light and
    // bubblewrap (tests/run.sh installs them) and fail when those are missing.

    #[test]
    fn fork_server_starts_and_computes() {
        let dir = tempfile::tempdir().unwrap();
        let script = crate::workspace().join("bench/peers/fork_server.py");
        let server = start_fork_server("/usr/bin/python3", &script, 1, 1, &[], dir.path()).unwrap();
        let response = process::http_request(
            server.addr,
            "POST",
            "/v1/exec",
            Some(r#"{"code":"print(6*7)"}"#),
        )
        .unwrap();
        assert_eq!(response.status, 200);
        let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(json["stdout"], "42\n");
        server.stop(Duration::from_secs(10));
    }

    #[test]
    fn node_fork_server_starts_and_computes() {
        let dir = tempfile::tempdir().unwrap();
        let script = crate::workspace().join("bench/peers/node_fork_server.js");
        let server = start_node_fork_server(NODE.path, &script, 1, dir.path()).unwrap();
        let response = process::http_request(
            server.addr,
            "POST",
            "/v1/exec",
            Some(r#"{"code":"console.log(6*7)","language":"node"}"#),
        )
        .unwrap();
        crate::workloads::check_exec_response(response.status, &response.body, "42\n").unwrap();
        server.stop(Duration::from_secs(10));
    }

    #[test]
    fn nginx_starts_and_answers_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_nginx(dir.path(), 1).unwrap();
        let response = process::http_request(server.addr, "GET", "/anything", None).unwrap();
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, &b"ok\n"[..])
        );
        let addr = server.addr;
        server.stop(Duration::from_secs(10));
        assert!(
            process::http_request(addr, "GET", "/", None).is_err(),
            "nginx still answers after stop"
        );
    }

    #[test]
    fn bubblewrap_peer_runs_python_without_network() {
        let peer = crate::spawn::SpawnPeer::bubblewrap(
            "bwrap",
            BWRAP.path,
            "/usr/bin/python3",
            "print(1+1)",
            "2\n",
        );
        peer.run_once().unwrap();
        // --unshare-all gives the sandbox its own network namespace: a port the
        // host listens on right now is not reachable from inside.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('reached host')\nexcept OSError as e:\n    print(type(e).__name__)"
        );
        let isolated = crate::spawn::SpawnPeer::bubblewrap(
            "bwrap-net",
            BWRAP.path,
            "/usr/bin/python3",
            &probe,
            "ConnectionRefusedError\n",
        );
        isolated.run_once().unwrap();
        let host =
            crate::spawn::SpawnPeer::python("host", "/usr/bin/python3", &probe, "reached host\n");
        host.run_once().unwrap();
    }

    #[test]
    fn nginx_conf_has_every_placeholder_filled() {
        let conf = nginx_conf(Path::new("/tmp/x"), "127.0.0.1:4321".parse().unwrap(), 2);
        assert!(!conf.contains('@'), "{conf}");
        assert!(conf.contains("listen 127.0.0.1:4321 backlog=4096;"));
        assert!(conf.contains("worker_processes 2;"));
        assert!(conf.contains("pid /tmp/x/nginx.pid;"));
    }

    #[test]
    fn finds_the_newest_complete_template() {
        let cache = tempfile::tempdir().unwrap();
        let templates = cache.path().join("templates");
        for name in [
            "python-old",
            "python-new",
            "python-new.tmp-123",
            "node-x",
            "python-empty",
        ] {
            std::fs::create_dir_all(templates.join(name)).unwrap();
        }
        std::fs::write(templates.join("python-old/state.snap"), b"").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(templates.join("python-new/state.snap"), b"").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(templates.join("python-new.tmp-123/state.snap"), b"").unwrap();
        std::fs::write(templates.join("node-x/state.snap"), b"").unwrap();
        assert_eq!(
            find_template_in(cache.path(), "python"),
            Some(templates.join("python-new"))
        );
        assert_eq!(
            find_template_in(cache.path(), "node"),
            Some(templates.join("node-x"))
        );
        assert_eq!(
            find_template_in(&cache.path().join("nowhere"), "python"),
            None
        );
    }
}

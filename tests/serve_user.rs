//! `kvmfork serve --user NAME` for real: a throwaway system user (created
//! here with `useradd --system`, removed afterwards) in a group that may
//! open /dev/kvm; the served process runs with that user's uid and gid,
//! real, effective, saved and filesystem (/proc/PID/status), and still
//! serves execs on the real Python template, given with `--template` and
//! found in the cache by the template builder process (whose filtered
//! template thread in the server must survive glibc's set-id broadcast).
//! Needs root, /dev/kvm and the template (tests/run.sh provides all three);
//! without them it fails.
//!
//! /dev/kvm access: distributions' udev rules make it `root:kvm 0660`. When
//! this host's device has no group access (some build hosts keep it
//! `root:root 0600`), the test gives it that standard setting for its run,
//! and puts the owner and mode back afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmfork::api::Language;

const KVM_GROUP: &str = "kvm";

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

/// Everything the test changed on the host, undone on drop (also when the
/// test fails).
struct Setup {
    user: String,
    group_created: bool,
    /// /dev/kvm's (gid, mode) before the test changed them.
    kvm_before: Option<(u32, u32)>,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("userdel").arg(&self.user).status();
        if let Some((gid, mode)) = self.kvm_before {
            let _ = std::os::unix::fs::chown("/dev/kvm", None, Some(gid));
            let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(mode));
        }
        if self.group_created {
            let _ = Command::new("groupdel").arg(KVM_GROUP).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").unwrap();
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// The `Uid:`/`Gid:`/`Groups:` fields of /proc/PID/status.
fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line[field.len() + 1..]
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).expect("a JSON body"))
}

/// Copies the template into `dir` (sparse), readable by any user: the
/// cache under root's home is not.
fn copy_template(dir: &std::path::Path) -> std::path::PathBuf {
    let source = std::env::var_os("KVMFORK_TEMPLATE")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| kvmfork::template::find_cached(Language::Python))
        .expect("no Python template: run `kvmfork template build` (tests/run.sh does) or set KVMFORK_TEMPLATE");
    let target = dir.join("template");
    run(
        "cp",
        &[
            "-r",
            "--sparse=always",
            source.to_str().unwrap(),
            target.to_str().unwrap(),
        ],
    );
    run("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
    target
}

#[test]
fn serve_runs_as_the_user_it_is_given_and_still_serves() {
    assert!(
        kvmfork::privileges::is_root(),
        "this test creates a system user: run it as root (tests/run.sh does)"
    );
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "no /dev/kvm on this host"
    );
    let user = format!("kvmfork-t{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("kvmfork-serve-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut setup = Setup {
        user: user.clone(),
        group_created: false,
        kvm_before: None,
        dir: dir.clone(),
        child: None,
    };
    if group_gid(KVM_GROUP).is_none() {
        run("groupadd", &["--system", KVM_GROUP]);
        setup.group_created = true;
    }
    let kvm_gid = group_gid(KVM_GROUP).unwrap();
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    if meta.gid() != kvm_gid || meta.mode() & 0o060 != 0o060 {
        setup.kvm_before = Some((meta.gid(), meta.mode() & 0o7777));
        std::os::unix::fs::chown("/dev/kvm", None, Some(kvm_gid)).unwrap();
        std::fs::set_permissions(
            "/dev/kvm",
            std::fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o060),
        )
        .unwrap();
    }
    run(
        "useradd",
        &[
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--groups",
            KVM_GROUP,
            &user,
        ],
    );
    let account = kvmfork::privileges::lookup(&user).unwrap();
    assert_ne!(account.uid, 0);
    let template = copy_template(&dir);
    // With the template given, and found in the cache by the builder
    // process (no guest sources: nothing is built). The second run is the
    // one whose filtered template thread sees the switch of user.
    serve_as(&mut setup, &account, kvm_gid, Some(&template));
    let cache = dir.join("cache").join("templates");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&template, cache.join("python-serve-user")).unwrap();
    run("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
    serve_as(&mut setup, &account, kvm_gid, None);
}

/// Runs `serve --user` (with `template`, or building from the cache) and
/// checks its ids, then that it serves an exec; stops it.
fn serve_as(
    setup: &mut Setup,
    account: &kvmfork::privileges::User,
    kvm_gid: u32,
    template: Option<&std::path::Path>,
) {
    if let Some(mut old) = setup.child.take() {
        let _ = old.kill();
        let _ = old.wait();
    }
    let user = account.name.clone();
    let dir = setup.dir.clone();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvmfork"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .args(["--workers-per-shard", "1", "--pool-size", "1"])
        .args(["--warm-sandboxes", "0", "--user", &user])
        .args([
            "--api-keys-file",
            "/nonexistent/kvmfork-serve-user-keys.json",
        ])
        .env("KVMFORK_CACHE_DIR", dir.join("cache"))
        .env("KVMFORK_GUEST_DIR", dir.join("no-guest-sources"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match template {
        Some(t) => command.args(["--template", t.to_str().unwrap()]),
        None => command.args(["--language", "python"]),
    };
    let mut child = command.spawn().expect("kvmfork starts");
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    setup.child = Some(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("serve| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("kvmfork serve never listened; log: {log:#?}"));
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        log.push(line);
    };
    assert!(
        log.iter().any(|l| l.contains(&format!(
            "running as user {user} (uid {}, gid {})",
            account.uid, account.gid
        ))),
        "{log:#?}"
    );
    // Real, effective, saved and filesystem ids, for every thread.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let path = format!("{pid}/task/{tid}");
        let ids = |field| {
            let text = std::fs::read_to_string(format!("/proc/{path}/status")).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .unwrap()
                .to_string();
            line.split_whitespace()
                .skip(1)
                .map(|v| v.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("Uid"), vec![account.uid; 4], "thread {tid}");
        assert_eq!(ids("Gid"), vec![account.gid; 4], "thread {tid}");
    }
    let groups = status_ids(pid, "Groups");
    assert!(groups.contains(&kvm_gid), "groups {groups:?}");
    assert!(!groups.contains(&0), "root's group was kept: {groups:?}");

    // It serves: the template loads as the user, and a fork runs.
    let ready = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, health) = request(addr, "GET", "/v1/health", "");
        if health["templates"]["python"]["ready"] == true {
            break;
        }
        assert!(
            Instant::now() < ready,
            "the template never loaded: {health}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = request(addr, "POST", "/v1/exec", r#"{"code":"print(6*7)"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "42\n", "{body}");
    assert_eq!(status_ids(pid, "Uid"), vec![account.uid; 4]);
}

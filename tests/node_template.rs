//! End-to-end tests of the fork engine on the real Node.js template (Linux +
//! Debian's node 18), through the engine, the `kvmfork run` CLI and HTTP.
//! Needs /dev/kvm and a built Node template (tests/run.sh builds it).

mod common;
#[path = "server_support/mod.rs"]
mod server_support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::real_node_template::*;
use common::real_template::{err, out};
use kvmfork::api::ExecFailure;
use kvmfork::engine::lane::Engine;
use kvmfork::engine::pool::PoolConfig;
use kvmfork::server::ServeConfig;
use server_support::{Client, TempFile};

const T: Duration = Duration::from_secs(60);

#[test]
fn javascript_gives_correct_output() {
    let mut p = node_pool();
    let r = p.exec(&js("console.log([1,2,3,4,5].reduce((a,b)=>a+b)/5)", T));
    assert_eq!(
        (out(&r), r.exit_code, r.failure.clone()),
        ("3\n".into(), 0, None),
        "stderr: {}",
        err(&r)
    );
    let r = p.exec(&js("console.log(1 + 1)", T));
    assert_eq!(out(&r), "2\n", "stderr: {}", err(&r));
    let r = p.exec(&js(
        "let s = 0; for (let i = 0; i < 1e6; i++) s += i; console.log(s, { a: [1, 'x'] })",
        T,
    ));
    assert_eq!(
        out(&r),
        "499999500000 { a: [ 1, 'x' ] }\n",
        "stderr: {}",
        err(&r)
    );
    let r = p.exec(&js(
        "console.error('to stderr'); process.stdout.write('x\\n')",
        T,
    ));
    assert_eq!((out(&r), err(&r)), ("x\n".into(), "to stderr\n".into()));
}

#[test]
fn async_code_with_await_and_timers_settles_before_the_answer() {
    let mut p = node_pool();
    let code =
        "async function twice(x) { await new Promise(r => setTimeout(r, 20)); return 2 * x; }\n\
                console.log(await twice(21));\n\
                setTimeout(() => console.log('timer'), 30);\n\
                Promise.resolve().then(() => console.log('microtask'));";
    let r = p.exec(&js(code, T));
    assert_eq!(
        (out(&r), r.exit_code),
        ("42\nmicrotask\ntimer\n".into(), 0),
        "stderr: {}",
        err(&r)
    );
}

#[test]
fn thread_pool_callbacks_complete_before_the_answer() {
    let mut p = node_pool();
    let code = "require('crypto').randomBytes(8, (e, b) => console.log('crypto', b.length));\n\
                require('fs').readFile('/etc/hosts', 'utf8', (e, d) => console.log('fs', e === null && d.includes('localhost')));";
    let r = p.exec(&js(code, T));
    let mut lines: Vec<String> = out(&r).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        (lines, r.exit_code),
        (vec!["crypto 8".to_string(), "fs true".to_string()], 0),
        "stderr: {}",
        err(&r)
    );
}

#[test]
fn errors_and_exit_codes_follow_node_e() {
    let mut p = node_pool();
    let r = p.exec(&js("function f() { throw new Error('boom'); }\nf()", T));
    assert_eq!(r.exit_code, 1);
    assert!(
        err(&r).contains("Error: boom") && err(&r).contains("at f ([eval]:1:"),
        "{}",
        err(&r)
    );
    let r = p.exec(&js(
        "console.log('before'); process.exit(3); console.log('after')",
        T,
    ));
    assert_eq!((r.exit_code, out(&r)), (3, "before\n".into()));
    let r = p.exec(&js(
        "setInterval(() => {}, 5); setTimeout(() => process.exit(5), 20)",
        T,
    ));
    assert_eq!(r.exit_code, 5, "stderr: {}", err(&r));
    let r = p.exec(&js("process.exitCode = 9", T));
    assert_eq!(r.exit_code, 9);
    let r = p.exec(&js("Promise.reject(new TypeError('nope'))", T));
    assert_eq!(r.exit_code, 1);
    assert!(err(&r).contains("TypeError: nope"), "{}", err(&r));
    let r = p.exec(&js("await null; throw new RangeError('after await')", T));
    assert_eq!(r.exit_code, 1);
    assert!(err(&r).contains("RangeError: after await"), "{}", err(&r));
    let r = p.exec(&js("function broken( {", T));
    assert_eq!(r.exit_code, 1);
    assert!(err(&r).contains("SyntaxError"), "{}", err(&r));
}

#[test]
fn infinite_loop_times_out_and_next_exec_works() {
    let mut p = node_pool();
    let started = Instant::now();
    let r = p.exec(&js("while (true) {}", Duration::from_secs(2)));
    let took = started.elapsed();
    assert_eq!(r.failure, Some(ExecFailure::Timeout));
    assert!(
        took < Duration::from_secs(10),
        "timeout of 2 s returned after {took:?}"
    );
    let r = p.exec(&js("console.log('alive')", T));
    assert_eq!(out(&r), "alive\n", "stderr: {}", err(&r));
}

#[test]
fn forks_get_distinct_randomness() {
    let mut p = node_pool();
    // Sync and thread-pool (async) OpenSSL draws, V8's Math.random.
    let code = "const c = require('crypto'); c.randomBytes(16, (e, b) => console.log(c.randomBytes(16).toString('hex'), Math.random(), c.randomUUID(), b.toString('hex')))";
    let mut seen = HashSet::new();
    for i in 0..100 {
        let r = p.exec(&js(code, T));
        assert_eq!(r.exit_code, 0, "fork {i}: {}", err(&r));
        let line = out(&r);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "fork {i}: {line:?}");
        for f in fields {
            assert!(
                seen.insert(f.to_string()),
                "fork {i} repeated a random value: {f}"
            );
        }
    }
}

#[test]
fn secrets_do_not_leak_between_sandboxes() {
    let mut p = node_pool();
    let r = p.exec(&js("require('fs').writeFileSync('/tmp/secret', 's3cr3t'); globalThis.LEAK = 1; console.log('written')", T));
    assert_eq!(out(&r), "written\n", "stderr: {}", err(&r));
    let r = p.exec(&js(
        "console.log(require('fs').existsSync('/tmp/secret'), typeof LEAK)",
        T,
    ));
    assert_eq!(
        out(&r),
        "false undefined\n",
        "the pooled VM kept the previous user's data"
    );
}

#[test]
fn oversized_output_is_truncated_and_flagged() {
    let mut p = node_pool();
    let r = p.exec(&js("process.stdout.write('x'.repeat(3_000_000))", T));
    assert!(r.stdout_truncated);
    assert!(r.stdout.len() <= 1 << 20);
    assert_eq!(r.failure, None);
}

#[test]
fn kvmfork_run_cli_runs_javascript() {
    let dir = node_template().dir.clone();
    let run = |code: &str| {
        Command::new(env!("CARGO_BIN_EXE_kvmfork"))
            .args(["run", "--language", "node", "--template"])
            .arg(&dir)
            .arg(code)
            .output()
            .expect("kvmfork run starts")
    };
    let o = run("console.log([1,2,3,4,5].reduce((a,b)=>a+b)/5)");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "3\n",
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0));
    let o = run("console.error('bad'); process.exit(7)");
    assert_eq!(
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned()
        ),
        (Some(7), "bad\n".into())
    );
}

#[test]
fn http_routes_node_and_javascript_to_the_node_template() {
    const KEY: &str = "node-template-test-key";
    let template = kvmfork::template::Template::load(&node_template().dir).expect("template loads");
    let keys = TempFile::new(&format!("[\"{KEY}\"]"));
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 1,
        queue_depth: 8,
        max_batch: 8,
        api_keys_file: keys.path.clone(),
        rate_limit: 0.0,
        ..ServeConfig::default()
    };
    let engine = Engine::new(
        vec![template],
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            ..Default::default()
        },
    );
    let handle = kvmfork::server::start(config, Arc::new(engine)).expect("server starts");
    let mut c = Client::connect(handle.local_addr());
    let auth = format!("Bearer {KEY}");
    for language in ["node", "javascript"] {
        let body = format!(
            r#"{{"code": "console.log([1,2,3,4,5].reduce((a,b)=>a+b)/5)", "language": "{language}"}}"#
        );
        c.send(
            "POST",
            "/v1/exec",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        );
        let r = c.read_response();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(
            (j["stdout"].as_str(), j["exit_code"].as_i64()),
            (Some("3\n"), Some(0)),
            "{j}"
        );
    }
    handle.shutdown();
}

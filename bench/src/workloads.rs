//! The workload suite (issue 12 §1): real snippets — big allocations, sorting,
//! JSON, regex, file I/O, pure compute, Python and Node — each run through
//! kvmfork's HTTP API, through a warm process peer (the fork server for
//! Python, pre-spawned Node processes for Node) and as a fresh process
//! (`python3 -c`, `node -e`), interleaved per snippet so the three share the
//! machine's noise. Every run's stdout is checked against the value the
//! snippet must print: a wrong answer is a failure, never a timing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::process;
use crate::results::{WorkloadPath, WorkloadRow};
use crate::spawn::SpawnPeer;
use crate::BenchError;

/// Request `timeout_seconds` of every workload exec: PVM snippets that grow
/// memory take tens of seconds today (issue 12: np.ones(10**7) took 27.8 s).
pub const EXEC_TIMEOUT_S: f64 = 300.0;
/// HTTP read timeout per request: the exec timeout plus room for the answer.
const READ_TIMEOUT: Duration = Duration::from_secs(EXEC_TIMEOUT_S as u64 + 30);
/// kvmfork serve --max-sandbox-dirty-mib for this phase. The largest snippet
/// writes a 200 MB numpy array (the default cap is 256 MiB, which leaves
/// little room for the interpreter, numpy's temporaries and the guest
/// kernel's page tables); the guest has 512 MiB of RAM, so this is the most a
/// snippet can use anyway, less what the guest kernel and the template hold.
pub const MAX_SANDBOX_DIRTY_MIB: usize = 448;
/// Unmeasured `print(1+1)` / `console.log(1+1)` runs per server before the
/// suite (a fresh process gets one, for the page cache).
pub const WARMUP_RUNS_HTTP: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Python,
    Node,
}

impl Language {
    /// The request's `language` field.
    pub fn wire(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
        }
    }
}

/// One snippet and what it must print.
#[derive(Debug, Clone, Copy)]
pub struct Snippet {
    /// Short, unique name (`--workload NAME`, the table's first column).
    pub name: &'static str,
    pub language: Language,
    pub code: &'static str,
    /// The exact stdout of a correct run.
    pub expected: &'static str,
    /// Modules the template must have; without them the row is skipped.
    pub needs: &'static [&'static str],
}

const fn py(name: &'static str, code: &'static str, expected: &'static str) -> Snippet {
    Snippet {
        name,
        language: Language::Python,
        code,
        expected,
        needs: &[],
    }
}

const fn js(name: &'static str, code: &'static str, expected: &'static str) -> Snippet {
    Snippet {
        name,
        language: Language::Node,
        code,
        expected,
        needs: &[],
    }
}

/// Modules probed once in the template (and on the host for the peers).
pub const OPTIONAL_MODULES: &[&str] = &["pandas", "matplotlib"];

/// The suite. Expected values were computed by Debian's CPython 3.11 and
/// Node 20 (the guest's versions); random data is seeded or a fixed LCG.
pub const SNIPPETS: &[Snippet] = &[
    py("print(1+1)", "print(1+1)", "2\n"),
    py(
        "np.ones(10**6) (8 MB)",
        "import numpy as np\na = np.ones(10**6)\nprint(a.sum())",
        "1000000.0\n",
    ),
    py(
        "np.ones(10**7) (80 MB)",
        "import numpy as np\na = np.ones(10**7)\nprint(a.sum())",
        "10000000.0\n",
    ),
    py(
        "np.ones(2.5*10**7) (200 MB)",
        "import numpy as np\na = np.ones(25 * 10**6)\nprint(a.sum())",
        "25000000.0\n",
    ),
    py(
        "list comprehension 10**6",
        "a = [i * i for i in range(10**6)]\nprint(len(a), sum(a))",
        "1000000 333332833333500000\n",
    ),
    py(
        "dict of 10**6",
        "d = {i: str(i) for i in range(10**6)}\nprint(len(d), d[999999])",
        "1000000 999999\n",
    ),
    py(
        "50 MB string",
        "s = 'ab' * (25 * 10**6)\nt = s.upper()\nprint(len(t), t[-2:])",
        "50000000 AB\n",
    ),
    py(
        "sort 10**6 random floats",
        "import random\nrandom.seed(12)\na = [random.random() for _ in range(10**6)]\nb = sorted(a)\nprint(len(b), round(b[500000], 6), b[0] <= b[1] <= b[-1])",
        "1000000 0.500031 True\n",
    ),
    py(
        "JSON dumps+loads 10**5 dicts",
        "import json\nd = [{'i': i, 's': str(i)} for i in range(10**5)]\nt = json.dumps(d)\ne = json.loads(t)\nprint(len(t), e[-1]['i'])",
        "2777780 99999\n",
    ),
    py(
        "regex findall over 3 MB",
        "import re\ntext = 'abc123 def4567 ' * 200000\nprint(len(text), len(re.findall(r'\\d+', text)))",
        "3000000 400000\n",
    ),
    py(
        "/tmp write+read 100 KB",
        "import os\np = '/tmp/kvmfork-workload-%d' % os.getpid()\nwith open(p, 'wb') as f:\n    f.write(b'x' * 102400)\nwith open(p, 'rb') as f:\n    n = len(f.read())\nos.remove(p)\nprint(n)",
        "102400\n",
    ),
    py(
        "/tmp write+read 10 MB",
        "import os\np = '/tmp/kvmfork-workload-%d' % os.getpid()\nwith open(p, 'wb') as f:\n    f.write(b'x' * 10485760)\nwith open(p, 'rb') as f:\n    n = len(f.read())\nos.remove(p)\nprint(n)",
        "10485760\n",
    ),
    py(
        "pure loop 10**7 additions",
        "t = 0\nfor i in range(10**7):\n    t += i\nprint(t)",
        "49999995000000\n",
    ),
    Snippet {
        name: "pandas group-by 10**6 rows",
        language: Language::Python,
        code: "import numpy as np, pandas as pd\ndf = pd.DataFrame({'k': np.arange(10**6) % 10, 'v': np.ones(10**6)})\ng = df.groupby('k')['v'].sum()\nprint(len(g), int(g.sum()), g[3])",
        expected: "10 1000000 100000.0\n",
        needs: &["pandas"],
    },
    Snippet {
        name: "matplotlib PNG",
        language: Language::Python,
        code: "import io, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot(range(1000), [i * i for i in range(1000)])\nb = io.BytesIO()\nfig.savefig(b, format='png')\npng = b.getvalue()\nprint(png[:8] == b'\\x89PNG\\r\\n\\x1a\\n', len(png) > 5000)",
        expected: "True True\n",
        needs: &["matplotlib"],
    },
    js("console.log(1+1)", "console.log(1+1)", "2\n"),
    js(
        "JS array 10**6",
        "const a = [];\nfor (let i = 0; i < 1e6; i++) a.push(i * 2);\nconsole.log(a.length, a[999999]);",
        "1000000 1999998\n",
    ),
    js(
        "Float64Array 10**7 (80 MB)",
        "const a = new Float64Array(1e7).fill(1);\nlet s = 0;\nfor (let i = 0; i < a.length; i++) s += a[i];\nconsole.log(s);",
        "10000000\n",
    ),
    js(
        "JSON of 10**5 objects",
        "const d = Array.from({ length: 1e5 }, (_, i) => ({ i, s: String(i) }));\nconst t = JSON.stringify(d);\nconst e = JSON.parse(t);\nconsole.log(t.length, e[99999].i);",
        "2377781 99999\n",
    ),
    js(
        "Buffer 50 MB",
        "const b = Buffer.alloc(50 * 1024 * 1024, 1);\nlet s = 0;\nfor (let i = 0; i < b.length; i += 4096) s += b[i];\nconsole.log(b.length, s);",
        "52428800 12800\n",
    ),
    js(
        "sort 10**6 numbers",
        "let x = 1;\nconst a = [];\nfor (let i = 0; i < 1e6; i++) { x = (x * 48271) % 2147483647; a.push(x); }\na.sort((p, q) => p - q);\nconsole.log(a.length, a[0], a[999999]);",
        "1000000 376 2147483426\n",
    ),
];

/// The snippets whose names contain one of `names` (case-insensitive; all of
/// them when `names` is empty), in suite order: `--workload np.ones` picks
/// the three numpy rows, a full name picks its row. A name that matches
/// nothing is an error listing the suite.
pub fn select(names: &[String]) -> Result<Vec<&'static Snippet>, String> {
    let matches =
        |pattern: &str, s: &Snippet| s.name.to_lowercase().contains(&pattern.to_lowercase());
    for name in names {
        if name.trim().is_empty() || !SNIPPETS.iter().any(|s| matches(name, s)) {
            let known: Vec<String> = SNIPPETS.iter().map(|s| format!("{:?}", s.name)).collect();
            return Err(format!(
                "no workload matches {name:?}; the suite has {}",
                known.join(", ")
            ));
        }
    }
    Ok(SNIPPETS
        .iter()
        .filter(|s| names.is_empty() || names.iter().any(|n| matches(n, s)))
        .collect())
}

/// Shortens a value for an error message.
fn clip(text: &str) -> String {
    const MAX: usize = 200;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

/// A run is right when it exited 0 and printed exactly `expected`.
pub fn check_output(
    stdout: &str,
    stderr: &str,
    exit_code: i64,
    expected: &str,
) -> Result<(), String> {
    if exit_code != 0 || stdout != expected {
        return Err(format!(
            "exit code {exit_code}, stdout {} (wanted {}), stderr {}",
            clip(stdout),
            clip(expected),
            clip(stderr.trim_end())
        ));
    }
    Ok(())
}

/// Checks a `POST /v1/exec` answer (kvmfork's or a peer's JSON shape).
pub fn check_exec_response(status: u16, body: &[u8], expected: &str) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        return Err(format!("HTTP {status}: {}", clip(&text)));
    }
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("answer is not JSON ({e}): {}", clip(&text)))?;
    if let Some(error) = json.get("error").filter(|e| !e.is_null()) {
        return Err(format!("error {error}"));
    }
    if json.get("timed_out") == Some(&serde_json::Value::Bool(true)) {
        return Err("timed out".into());
    }
    let field = |name: &str| json.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let exit_code = json
        .get("exit_code")
        .and_then(|v| v.as_i64())
        .ok_or_else(|| format!("no exit_code in {}", clip(&text)))?;
    check_output(field("stdout"), field("stderr"), exit_code, expected)
}

/// Nearest-rank percentile of a non-empty, sorted sample.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One way of running a snippet.
pub enum Runner {
    /// POST /v1/exec to a server speaking kvmfork's API.
    Http { addr: SocketAddr },
    /// A fresh process: `argv` followed by the code.
    Spawn { argv: Vec<String> },
}

impl Runner {
    /// One checked run; returns its wall time (client-side: connect to answer,
    /// or spawn to exit).
    pub fn run(&self, snippet: &Snippet) -> Result<Duration, String> {
        match self {
            Runner::Http { addr } => {
                let body = serde_json::json!({
                    "code": snippet.code,
                    "language": snippet.language.wire(),
                    "timeout_seconds": EXEC_TIMEOUT_S,
                })
                .to_string();
                let start = Instant::now();
                let response = process::http_request_with_timeout(
                    *addr,
                    "POST",
                    "/v1/exec",
                    Some(&body),
                    READ_TIMEOUT,
                )
                .map_err(|e| format!("POST /v1/exec: {e}"))?;
                let took = start.elapsed();
                check_exec_response(response.status, &response.body, snippet.expected)?;
                Ok(took)
            }
            Runner::Spawn { argv } => {
                let mut full = argv.clone();
                full.push(snippet.code.into());
                let peer = SpawnPeer {
                    label: argv.join(" "),
                    argv: full,
                    expected_stdout: snippet.expected.into(),
                };
                peer.run_once().map_err(|e| match e {
                    BenchError::Probe { detail, .. } => detail,
                    other => other.to_string(),
                })
            }
        }
    }
}

/// A path in the table: its label and how to run on it, or why it cannot.
pub struct Path3 {
    pub label: String,
    pub runner: Result<Runner, String>,
}

/// The three paths of one language.
pub struct Paths {
    pub kvmfork: Path3,
    pub warm: Path3,
    pub fresh: Path3,
}

/// What the template and the host can import, probed once.
#[derive(Debug, Clone, Default)]
pub struct Modules {
    pub template: Vec<String>,
    pub host: Vec<String>,
}

/// Code that prints which of `modules` can be imported (without importing them).
pub fn probe_code(modules: &[&str]) -> String {
    format!("import importlib.util as u\nprint(' '.join(m for m in {modules:?} if u.find_spec(m)))")
}

/// Parses the probe's stdout.
pub fn parse_probe(stdout: &str) -> Vec<String> {
    stdout.split_whitespace().map(str::to_string).collect()
}

/// Asks a kvmfork server which optional modules its Python template has.
pub fn probe_template(addr: SocketAddr) -> Result<Vec<String>, BenchError> {
    let body = serde_json::json!({"code": probe_code(OPTIONAL_MODULES), "language": "python", "timeout_seconds": 60})
        .to_string();
    let fail = |detail: String| BenchError::Probe {
        what: "kvmfork module probe".into(),
        detail,
    };
    let response =
        process::http_request_with_timeout(addr, "POST", "/v1/exec", Some(&body), READ_TIMEOUT)
            .map_err(|e| fail(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(&response.body)
        .map_err(|e| fail(format!("HTTP {}: {e}", response.status)))?;
    if response.status != 200 || json["exit_code"] != 0 {
        return Err(fail(format!("HTTP {}: {json}", response.status)));
    }
    Ok(parse_probe(json["stdout"].as_str().unwrap_or("")))
}

/// The same probe on the host's CPython (for the fork server and `python3 -c`).
pub fn probe_host(python: &str) -> Vec<String> {
    std::process::Command::new(python)
        .args(["-c", &probe_code(OPTIONAL_MODULES)])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| parse_probe(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

/// Why a path cannot run `snippet`, if it cannot.
pub fn missing_module(snippet: &Snippet, have: &[String]) -> Option<&'static str> {
    snippet
        .needs
        .iter()
        .copied()
        .find(|m| !have.iter().any(|h| h == m))
}

/// Runs every snippet `runs` times on its language's three paths, the paths
/// interleaved within each round (and the order rotated per round) so a
/// noisy moment of the shared machine lands on all of them. A path that
/// fails a snippet is not run again for it: the row shows the failure. With
/// a `budget`, a path whose runs of a snippet took that long in total makes
/// no further run of it (at least one always runs): on PVM one 200 MB
/// snippet takes minutes through kvmfork today.
pub fn run_suite(
    snippets: &[&Snippet],
    runs: usize,
    budget: Option<Duration>,
    python: &Paths,
    node: &Paths,
    modules: &Modules,
    progress: &dyn Fn(&str),
) -> Vec<WorkloadRow> {
    // Unmeasured trivial runs first: a server's first execs are not a
    // snippet's cost (kvmfork's first exec on each pooled VM takes ~20 ms
    // on PVM, against ~0.5 ms once warm; measured: the first 8 of a new
    // server took 13-25 ms).
    for (language, paths) in [(Language::Python, python), (Language::Node, node)] {
        if !snippets.iter().any(|s| s.language == language) {
            continue;
        }
        let trivial = SNIPPETS
            .iter()
            .find(|s| s.language == language)
            .expect("the suite has a snippet of each language");
        for path in [&paths.kvmfork, &paths.warm, &paths.fresh] {
            if let Ok(runner) = &path.runner {
                if let Err(e) = runner.run(trivial) {
                    progress(&format!(
                        "  warm-up {} via {}: FAILED: {e}",
                        trivial.name, path.label
                    ));
                }
            }
        }
    }
    let mut rows = Vec::new();
    for snippet in snippets {
        let paths = match snippet.language {
            Language::Python => python,
            Language::Node => node,
        };
        let mut row = WorkloadRow {
            name: snippet.name.into(),
            language: snippet.language.wire().into(),
            code: snippet.code.into(),
            expected_stdout: snippet.expected.into(),
            skipped: None,
            kvmfork: WorkloadPath::new(&paths.kvmfork.label),
            warm: WorkloadPath::new(&paths.warm.label),
            fresh: WorkloadPath::new(&paths.fresh.label),
        };
        if let Some(m) = missing_module(snippet, &modules.template) {
            row.skipped = Some(format!("template lacks {m}"));
            progress(&format!("  {}: skipped: template lacks {m}", snippet.name));
            rows.push(row);
            continue;
        }
        let host_missing = missing_module(snippet, &modules.host);
        let mut slots: Vec<(&Path3, &mut WorkloadPath)> = vec![
            (&paths.kvmfork, &mut row.kvmfork),
            (&paths.warm, &mut row.warm),
            (&paths.fresh, &mut row.fresh),
        ];
        for (i, (path, result)) in slots.iter_mut().enumerate() {
            if let Err(why) = &path.runner {
                result.error = Some(why.clone());
            } else if let (Some(m), true) = (host_missing, i > 0) {
                result.error = Some(format!("not run: host lacks {m}"));
            }
        }
        for round in 0..runs {
            for k in 0..slots.len() {
                let (path, result) = &mut slots[(round + k) % 3];
                let Ok(runner) = &path.runner else { continue };
                if result.error.is_some() {
                    continue;
                }
                let spent_ms: f64 = result.runs_ms.iter().sum();
                if budget.is_some_and(|b| spent_ms >= b.as_secs_f64() * 1000.0) {
                    continue;
                }
                match runner.run(snippet) {
                    Ok(took) => result.runs_ms.push(took.as_secs_f64() * 1000.0),
                    Err(e) => {
                        progress(&format!(
                            "  {} via {}: FAILED: {e}",
                            snippet.name, path.label
                        ));
                        result.error = Some(e);
                    }
                }
            }
        }
        for (_, result) in slots.iter_mut() {
            result.summarise();
        }
        progress(&format!(
            "  {}: kvmfork {}, {} {}, {} {}",
            snippet.name,
            row.kvmfork.cell_of(runs),
            row.warm.label,
            row.warm.cell_of(runs),
            row.fresh.label,
            row.fresh.cell_of(runs)
        ));
        rows.push(row);
    }
    rows
}

/// The fresh-process command of a language (`python3 -c`, `node -e`).
pub fn fresh_argv(language: Language, python: &str, node: &str) -> Vec<String> {
    match language {
        Language::Python => vec![python.into(), "-c".into()],
        Language::Node => vec![node.into(), "-e".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_has_the_snippets_the_issue_asks_for() {
        let python = SNIPPETS
            .iter()
            .filter(|s| s.language == Language::Python)
            .count();
        let node = SNIPPETS
            .iter()
            .filter(|s| s.language == Language::Node)
            .count();
        assert!(python >= 12, "{python} Python snippets");
        assert!(node >= 5, "{node} Node snippets");
        let mut names: Vec<&str> = SNIPPETS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SNIPPETS.len(), "names must be unique");
        for s in SNIPPETS {
            assert!(s.expected.ends_with('\n'), "{}", s.name);
            assert!(!s.name.contains('|'), "{} breaks the table", s.name);
            for m in s.needs {
                assert!(
                    OPTIONAL_MODULES.contains(m),
                    "{} needs unprobed {m}",
                    s.name
                );
            }
        }
    }

    /// Runs each snippet as a fresh host process and checks its expected
    /// output — the values the suite checks kvmfork against are right.
    /// Needs Debian's python3 with numpy and nodejs (tests/run.sh installs
    /// them); the pandas/matplotlib rows are checked only where installed.
    #[test]
    fn expected_outputs_are_what_the_host_interpreters_print() {
        let host = probe_host("/usr/bin/python3");
        for s in SNIPPETS {
            if missing_module(s, &host).is_some() {
                continue;
            }
            let runner = Runner::Spawn {
                argv: fresh_argv(s.language, "/usr/bin/python3", "/usr/bin/node"),
            };
            runner.run(s).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        }
    }

    #[test]
    fn select_by_name_keeps_suite_order_and_refuses_unknown_names() {
        assert_eq!(select(&[]).unwrap().len(), SNIPPETS.len());
        let picked = select(&["console.log(1+1)".into(), "print(1+1)".into()]).unwrap();
        let names: Vec<&str> = picked.iter().map(|s| s.name).collect();
        assert_eq!(names, ["print(1+1)", "console.log(1+1)"]);
        let numpy: Vec<&str> = select(&["NP.ONES".into()])
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(numpy.len(), 3, "{numpy:?}");
        assert_eq!(
            select(&["sort".into(), "sort 10**6".into()]).unwrap().len(),
            2
        );
        let err = select(&["print(2+2)".into()]).unwrap_err();
        assert!(
            err.contains("\"print(2+2)\"") && err.contains("\"np.ones(10**7) (80 MB)\""),
            "{err}"
        );
        assert!(
            select(&[" ".into()]).is_err(),
            "a blank name matches everything"
        );
    }

    #[test]
    fn output_checker_wants_exact_stdout_and_exit_zero() {
        assert!(check_output("2\n", "", 0, "2\n").is_ok());
        let wrong = check_output("3\n", "", 0, "2\n").unwrap_err();
        assert!(
            wrong.contains("\"3\\n\"") && wrong.contains("\"2\\n\""),
            "{wrong}"
        );
        assert!(check_output("2", "", 0, "2\n").is_err(), "missing newline");
        assert!(check_output("2\n", "", 1, "2\n").is_err(), "exit code");
        let long = "x".repeat(10_000);
        let clipped = check_output(&long, "Traceback…", 0, "2\n").unwrap_err();
        assert!(
            clipped.len() < 1000 && clipped.contains("(10000 bytes)"),
            "{clipped}"
        );
        assert!(clipped.contains("Traceback"), "{clipped}");
    }

    #[test]
    fn response_checker_reads_kvmfork_json() {
        let ok = br#"{"stdout":"2\n","stderr":"","exit_code":0,"timed_out":false,"error":null}"#;
        assert!(check_exec_response(200, ok, "2\n").is_ok());
        let peer = br#"{"stdout":"2\n","stderr":"","exit_code":0}"#;
        assert!(check_exec_response(200, peer, "2\n").is_ok(), "peer shape");
        assert!(check_exec_response(200, ok, "3\n").is_err());
        let failed =
            br#"{"stdout":"2\n","stderr":"boom","exit_code":1,"timed_out":false,"error":null}"#;
        let e = check_exec_response(200, failed, "2\n").unwrap_err();
        assert!(e.contains("exit code 1") && e.contains("boom"), "{e}");
        let limited = br#"{"stdout":"","stderr":"","exit_code":-1,"timed_out":false,"error":{"code":"memory_limit","message":"m"}}"#;
        let e = check_exec_response(200, limited, "2\n").unwrap_err();
        assert!(e.contains("memory_limit"), "{e}");
        let timed = br#"{"stdout":"2\n","stderr":"","exit_code":0,"timed_out":true,"error":null}"#;
        assert_eq!(
            check_exec_response(200, timed, "2\n").unwrap_err(),
            "timed out"
        );
        let e = check_exec_response(503, br#"{"error":{"code":"busy"}}"#, "2\n").unwrap_err();
        assert!(e.starts_with("HTTP 503"), "{e}");
        assert!(check_exec_response(200, b"not json", "2\n").is_err());
        assert!(
            check_exec_response(200, br#"{"stdout":"2\n"}"#, "2\n").is_err(),
            "no exit code"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = [1.0, 2.0, 3.0];
        assert_eq!(percentile(&s, 0.5), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&[5.0], 0.9), 5.0);
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 0.9), 9.0);
        assert_eq!(percentile(&ten, 0.5), 5.0);
    }

    #[test]
    fn probe_parsing_and_module_gating() {
        assert_eq!(parse_probe("pandas matplotlib\n"), ["pandas", "matplotlib"]);
        assert!(parse_probe("\n").is_empty());
        let code = probe_code(&["pandas"]);
        assert!(code.contains("[\"pandas\"]"), "{code}");
        let pandas = SNIPPETS.iter().find(|s| s.needs == ["pandas"]).unwrap();
        assert_eq!(missing_module(pandas, &[]), Some("pandas"));
        assert_eq!(missing_module(pandas, &["pandas".into()]), None);
        assert_eq!(missing_module(&SNIPPETS[0], &[]), None);
    }

    fn sh_paths() -> Paths {
        let sh = |script: &str| Path3 {
            label: script.into(),
            runner: Ok(Runner::Spawn {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()],
            }),
        };
        Paths {
            // "$1" is the snippet's code: echo it back, or print a wrong value.
            kvmfork: sh("printf '%s\\n' \"$1\""),
            warm: sh("echo wrong"),
            fresh: Path3 {
                label: "absent".into(),
                runner: Err("not installed".into()),
            },
        }
    }

    #[test]
    fn a_budget_stops_a_slow_path_after_the_run_that_crossed_it() {
        let snippet = Snippet {
            name: "slow",
            language: Language::Node,
            code: "0.3",
            expected: "done\n",
            needs: &[],
        };
        let slow = Path3 {
            label: "slow".into(),
            runner: Ok(Runner::Spawn {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "sleep \"$1\"; echo done".into(),
                    "sh".into(),
                ],
            }),
        };
        let fast = |label: &str| Path3 {
            label: label.into(),
            runner: Ok(Runner::Spawn {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo done".into(),
                    "sh".into(),
                ],
            }),
        };
        let node = Paths {
            kvmfork: slow,
            warm: fast("warm"),
            fresh: fast("fresh"),
        };
        let rows = run_suite(
            &[&snippet],
            4,
            Some(Duration::from_millis(500)),
            &sh_paths(),
            &node,
            &Modules::default(),
            &|_| {},
        );
        // 0.3 s, 0.6 s (over the budget): stop. The fast paths make all 4.
        assert_eq!(rows[0].kvmfork.runs_ms.len(), 2, "{:?}", rows[0].kvmfork);
        assert_eq!(rows[0].warm.runs_ms.len(), 4);
        assert_eq!(rows[0].fresh.runs_ms.len(), 4);
        assert!(rows[0].kvmfork.p50_ms.unwrap() >= 300.0);
    }

    #[test]
    fn suite_records_timings_failures_and_skips() {
        let echo = Snippet {
            name: "echo",
            language: Language::Python,
            code: "hello",
            expected: "hello\n",
            needs: &[],
        };
        let gated = Snippet {
            name: "gated",
            needs: &["pandas"],
            ..echo
        };
        let lines = std::cell::RefCell::new(Vec::new());
        let rows = run_suite(
            &[&echo, &gated],
            5,
            None,
            &sh_paths(),
            &sh_paths(),
            &Modules::default(),
            &|l| lines.borrow_mut().push(l.to_string()),
        );
        let row = &rows[0];
        assert_eq!(row.kvmfork.runs_ms.len(), 5);
        assert!(row.kvmfork.p50_ms.is_some() && row.kvmfork.p90_ms.is_some());
        assert!(row.kvmfork.error.is_none());
        // A wrong answer is a failure, run once and never timed.
        assert!(row.warm.runs_ms.is_empty() && row.warm.p50_ms.is_none());
        assert!(row.warm.error.as_deref().unwrap().contains("\"wrong\\n\""));
        assert_eq!(row.fresh.error.as_deref(), Some("not installed"));
        assert_eq!(rows[1].skipped.as_deref(), Some("template lacks pandas"));
        assert!(rows[1].kvmfork.runs_ms.is_empty());
        let lines = lines.into_inner();
        assert!(lines.iter().any(|l| l.contains("FAILED")), "{lines:?}");
    }
}

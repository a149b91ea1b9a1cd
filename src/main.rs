//! `kvmfork`: build templates, run code in sandboxes, benchmark forks, serve the API.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use kvmfork::api::{CancelToken, ExecRequest, Language};
use kvmfork::template::{self, BuildOptions};

#[derive(Parser)]
#[command(
    name = "kvmfork",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("KVMFORK_GIT_COMMIT"), ")"),
    about = "Copy-on-write KVM sandboxes for running untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
// Parsed once per process.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Build or describe templates (a booted, snapshotted guest per language).
    Template {
        #[command(subcommand)]
        command: TemplateCmd,
    },
    /// Benchmarks (percentiles, side by side with the alternatives).
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
    /// Serve the HTTP API for Python and Node. Templates that are not cached
    /// yet are built in the background (Python first); each language is served
    /// as soon as its template is ready.
    Serve {
        #[command(flatten)]
        server: kvmfork::server::ServeArgs,
        /// Languages to serve: repeat the flag or give a comma-separated list
        /// (default: python,node).
        #[arg(long, value_delimiter = ',', conflicts_with = "template")]
        language: Vec<String>,
        /// Template directories to serve instead (loaded before serving, never
        /// built; the languages served are theirs).
        #[arg(long)]
        template: Vec<PathBuf>,
        /// Idle pre-created VMs kept per worker and template.
        #[arg(long, default_value_t = 2)]
        pool_size: usize,
        /// Clean idle VMs an idle worker keeps ready per template for forks
        /// of live sessions (a fork onto one costs no memory-slot cycle; a
        /// fan-out of N children is fastest with N ready). Raises
        /// --pool-size to match. About 1.5 MB of host memory each.
        #[arg(long, default_value_t = 2)]
        warm_sandboxes: usize,
        /// Most guest memory one exec may dirty, in MiB (copy-on-write host memory).
        #[arg(long, default_value_t = 256)]
        max_sandbox_dirty_mib: usize,
        /// Most bytes of stdout (and of stderr) returned per exec.
        #[arg(long, default_value_t = 1 << 20)]
        max_output_bytes: u32,
        #[command(flatten)]
        sessions: kvmfork::engine::session::SessionArgs,
    },
    /// Serve the Model Context Protocol on stdio (or streamable HTTP with
    /// --listen): tools that run code in
    /// sandboxes (run_code, create_sandbox, run_in_sandbox, fork_sandbox,
    /// checkpoint_sandbox, restore_sandbox, delete_sandbox) through a running
    /// kvmfork HTTP API.
    Mcp {
        #[command(flatten)]
        args: kvmfork::mcp::McpArgs,
    },
    /// Run code in a fresh fork of the template and print its output.
    Run {
        #[arg(long, default_value = "python")]
        language: String,
        /// Wall-clock limit in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Template directory (default: the cached one for the language).
        #[arg(long)]
        template: Option<PathBuf>,
        /// The code, or `-` to read it from standard input.
        code: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Fork and fork+exec latency (pooled reset vs fresh VM) and memory per sandbox.
    Fork {
        #[arg(long, default_value = "python")]
        language: String,
        #[arg(long)]
        template: Option<PathBuf>,
        #[arg(long, default_value_t = 500)]
        iterations: usize,
        /// Comma-separated numbers of sandboxes alive at once.
        #[arg(long, default_value = "1,10,100,1000")]
        alive: String,
        /// Code to exec (default: the language's print(1+1)).
        #[arg(long)]
        code: Option<String>,
        /// Largest alive count at which each sandbox also runs the code once.
        #[arg(long, default_value_t = 100)]
        max_exec_alive: usize,
    },
    /// Live sessions: exec, live fork by session size, fan-out, checkpoint
    /// and restore, next to a fresh VM restored from the session's snapshot.
    Sessions {
        #[arg(long)]
        template: Option<PathBuf>,
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        /// Comma-separated MiB of state the measured sessions hold.
        #[arg(long, default_value = "1,16")]
        state_mib: String,
        /// Children made at once from one session.
        #[arg(long, default_value_t = 100)]
        fan_out: usize,
        /// Live sessions to hold at once, each answering an exec (0: skip).
        #[arg(long, default_value_t = 1000)]
        hold: usize,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build the kernel, root filesystem and template (cached by input hash).
    Build {
        #[arg(long, default_value = "python")]
        language: String,
        /// Output directory (default: the cache).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        ram_mib: u64,
        /// Show the guest console while it boots.
        #[arg(long)]
        verbose: bool,
        /// Give up if the guest is not ready after this many seconds.
        #[arg(long, default_value_t = 1800)]
        boot_timeout: u64,
        /// Build even if a cached template exists.
        #[arg(long)]
        rebuild: bool,
        /// Development: boot this vmlinux instead of the guest/kernel build.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Development: boot this initramfs instead of the guest/rootfs build.
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    /// Print a template's metadata.
    Inspect { dir: PathBuf },
    /// `serve`'s template builder process (not for direct use): builds or
    /// finds each language's template in turn and reports one line per
    /// language on stdout, `ok LANG DIR` or `err LANG REASON`.
    #[command(hide = true)]
    Provide {
        #[arg(long, value_delimiter = ',')]
        language: Vec<String>,
        /// Switch to this user first (serve's --user).
        #[arg(long)]
        user: Option<String>,
        /// The server's pid: the builder exits if it is no longer its
        /// parent (the server died before the builder could watch it).
        #[arg(long)]
        parent: Option<u32>,
    },
}

fn parse_language(s: &str) -> Result<Language, String> {
    Language::from_wire(s).ok_or_else(|| format!("unknown language {s:?} (python, node)"))
}

fn load_template(language: Language, dir: Option<PathBuf>) -> Result<template::Template, String> {
    let dir = match dir {
        Some(d) => d,
        None => template::find_cached(language).ok_or_else(|| {
            template::TemplateError::Missing(language.as_str().into()).to_string()
        })?,
    };
    template::Template::load(&dir).map_err(|e| format!("loading template {}: {e}", dir.display()))
}

/// The languages `serve` serves: those named by `--language` (repeatable,
/// comma-separated), else every language.
fn serve_languages(names: &[String]) -> Result<Vec<Language>, String> {
    if names.is_empty() {
        return Ok(vec![Language::Python, Language::Node]);
    }
    let mut langs = Vec::new();
    for name in names {
        let name = name.trim();
        if name.is_empty() {
            return Err("--language: empty language name".into());
        }
        let lang = parse_language(name).map_err(|e| format!("--language: {e}"))?;
        if !langs.contains(&lang) {
            langs.push(lang);
        }
    }
    Ok(langs)
}

/// The template of `language` for the guest sources this binary was built
/// with: found in the cache by the hash of its inputs, or built (minutes on
/// PVM hosts). Without the guest sources (an installed binary), the newest
/// cached template of the language.
fn template_dir(language: Language) -> Result<PathBuf, String> {
    let lang = language.as_str();
    let guest = template::guest_dir();
    let dir = if guest.join("kernel/build.sh").is_file() {
        eprintln!(
            "kvmfork serve: preparing the {lang} template (cached by the hash of its inputs; \
             building a missing one takes minutes on PVM hosts); {lang} requests answer \
             503 template_building until it is ready"
        );
        let opts = BuildOptions {
            language,
            out: None,
            ram_mib: 512,
            verbose: false,
            boot_timeout: Duration::from_secs(3600),
            rebuild: false,
            kernel: None,
            initrd: None,
        };
        template::build(&opts).map_err(|e| e.to_string())?
    } else {
        template::find_cached(language).ok_or_else(|| {
            format!(
                "no {lang} template in {} and no guest sources at {} to build one \
                 (build it with `kvmfork template build --language {lang}`, or pass --template)",
                template::cache_dir().join("templates").display(),
                guest.display()
            )
        })?
    };
    Ok(dir)
}

/// `kvmfork template provide`: [`template_dir`] for each language, one
/// line each on stdout. Runs in a process of its own, unfiltered, because
/// building runs the guest build scripts (bash, make, a compiler, dpkg): no
/// default-deny list for those would be worth the name, and seccomp
/// filters are inherited across fork and exec.
fn provide_templates(
    languages: &[String],
    user: Option<&str>,
    parent: Option<u32>,
) -> Result<ExitCode, String> {
    if let Some(name) = user {
        let user = kvmfork::privileges::lookup(name)?;
        kvmfork::privileges::drop_to(&user)?;
    }
    die_with_parent(parent);
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for name in languages {
        let language = parse_language(name)?;
        let line = match std::panic::catch_unwind(|| template_dir(language)) {
            Ok(Ok(dir)) => format!("ok {name} {}", dir.display()),
            Ok(Err(why)) => format!("err {name} {}", why.replace('\n', " ")),
            Err(_) => format!("err {name} building the template panicked (see the log)"),
        };
        failed |= line.starts_with("err");
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The builder and its build scripts go when the server's template thread
/// does (a killed server leaves no build behind). Set after `--user`'s
/// switch, since the kernel clears the death signal when the uid changes.
/// Run by `serve`, the builder leads its own process group, which holds the
/// build scripts too: the death signal's handler kills the whole group.
fn die_with_parent(parent: Option<u32>) {
    /// SIGHUP's handler: SIGKILL to this process group (kill is
    /// async-signal-safe).
    extern "C" fn kill_group(_: libc::c_int) {
        // SAFETY: no memory arguments; 0 is the caller's own group, which
        // this process leads (checked before the handler was installed).
        unsafe { libc::kill(0, libc::SIGKILL) };
    }
    // SAFETY: no arguments.
    let leader = unsafe { libc::getpgrp() == libc::getpid() };
    let signal = if leader {
        // SAFETY: a zeroed sigaction with a handler that only calls kill;
        // the struct outlives the call, the old action is not asked for.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = kill_group as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut());
        }
        libc::SIGHUP
    } else {
        libc::SIGKILL
    };
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no memory arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) };
    // The parent may have died before the signal was set: then this
    // process was reparented and nothing will send it.
    // SAFETY: no arguments.
    let ppid = unsafe { libc::getppid() };
    if parent.is_some_and(|p| p as libc::pid_t != ppid) {
        eprintln!("kvmfork template provide: the server (pid {parent:?}) is gone: exiting");
        std::process::exit(1);
    }
}

/// The template builder's process group (its pid), killed when the server
/// stops or fails to start; 0 when there is none or it is being reaped.
#[derive(Clone, Default)]
struct BuilderGroup(std::sync::Arc<std::sync::atomic::AtomicI32>);

impl BuilderGroup {
    fn set(&self, pgid: i32) {
        self.0.store(pgid, std::sync::atomic::Ordering::SeqCst);
    }

    /// SIGKILL to the builder and its build scripts, if still running.
    fn kill(&self) {
        let pgid = self.0.swap(0, std::sync::atomic::Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: no memory arguments; a negative pid names the group
            // the builder leads (its pid, not yet reaped: the template
            // thread clears it before waiting).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Kills the builder's group when dropped: `serve` holds it until the
/// server has stopped (or failed to start).
struct BuilderGuard(BuilderGroup);

impl Drop for BuilderGuard {
    fn drop(&mut self) {
        self.0.kill();
    }
}

/// Reads the builder process's line for `language`: the template's
/// directory, or why there is none.
fn read_provided(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    language: Language,
) -> Result<PathBuf, String> {
    let lang = language.as_str();
    let line = match lines.next() {
        Some(Ok(line)) => line,
        Some(Err(e)) => return Err(format!("reading the template builder's answer: {e}")),
        None => return Err("the template builder process exited early (see the log)".into()),
    };
    let rest = line
        .split_once(' ')
        .map(|(verdict, rest)| (verdict, rest.split_once(' ')));
    match rest {
        Some(("ok", Some((l, dir)))) if l == lang => Ok(PathBuf::from(dir)),
        Some(("err", Some((l, why)))) if l == lang => Err(why.to_string()),
        _ => Err(format!(
            "unexpected answer from the template builder: {line:?}"
        )),
    }
}

/// Builds or loads each language's template in turn and publishes it in
/// `registry` (ready, or failed with the reason). The building is done by a
/// child process (`kvmfork template provide`), started first thing by a
/// background thread that then installs the template-loader filter: what
/// stays in the server, loading a snapshot and running its start-up probe,
/// is filtered like an exec worker.
fn provision_templates(
    registry: std::sync::Arc<kvmfork::engine::lane::TemplateRegistry>,
    seccomp: kvmfork::seccomp::Mode,
    user: Option<String>,
) -> Result<BuilderGuard, String> {
    let group = BuilderGroup::default();
    let guard = BuilderGuard(group.clone());
    let languages: Vec<String> = registry
        .languages()
        .iter()
        .map(|l| l.as_str().to_string())
        .collect();
    std::thread::Builder::new()
        .name("kvmfork-templates".into())
        .spawn(move || {
            let mut command = std::process::Command::new(
                std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
            );
            command
                .args(["template", "provide", "--language", &languages.join(",")])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped());
            if let Some(user) = &user {
                command.args(["--user", user]);
            }
            // Its own group, so the server can kill the build scripts too.
            std::os::unix::process::CommandExt::process_group(&mut command, 0)
                .args(["--parent", &std::process::id().to_string()]);
            let mut child = command.spawn();
            if let Ok(c) = &child {
                group.set(c.id() as i32);
            }
            // Filtered from here on: the builder process was spawned above.
            if let Err(e) =
                kvmfork::seccomp::install(kvmfork::seccomp::ThreadKind::TemplateLoader, seccomp)
            {
                eprintln!("kvmfork serve: ERROR: {e}");
                for language in registry.languages() {
                    let _ = registry.set_failed(language, e.to_string());
                }
                group.kill();
                if let Ok(child) = &mut child {
                    let _ = child.wait();
                }
                return;
            }
            let mut lines = child
                .as_mut()
                .ok()
                .and_then(|c| c.stdout.take())
                .map(|out| std::io::BufRead::lines(std::io::BufReader::new(out)));
            for language in registry.languages() {
                let started = std::time::Instant::now();
                registry.start(language);
                let lang = language.as_str();
                let dir = match (&child, lines.as_mut()) {
                    (Err(e), _) => Err(format!("starting the template builder process: {e}")),
                    (Ok(_), Some(lines)) => read_provided(lines, language),
                    (Ok(_), None) => Err("the template builder process has no output".into()),
                };
                // A panic must not leave the slot "building" forever.
                let provided = std::panic::catch_unwind(|| {
                    let dir = dir?;
                    template::Template::load(&dir)
                        .map_err(|e| format!("loading template {}: {e}", dir.display()))
                })
                .unwrap_or_else(|_| Err("loading the template panicked (see the log)".into()));
                let outcome = match provided {
                    Ok(t) => {
                        let dir = t.dir.clone();
                        registry
                            .set_ready(language, std::sync::Arc::new(t))
                            .map(|()| dir)
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(dir) => eprintln!(
                        "kvmfork serve: serving the {lang} template {} (ready after {:.1} s)",
                        dir.display(),
                        started.elapsed().as_secs_f64()
                    ),
                    Err(why) => {
                        eprintln!(
                            "kvmfork serve: ERROR: the {lang} template failed: {why}\n\
                             kvmfork serve: ERROR: {lang} requests answer 500 template_failed; \
                             GET /v1/health shows the error; fix it and restart"
                        );
                        let _ = registry.set_failed(language, why);
                    }
                }
            }
            // Every answer is in: the builder is exiting. Cleared before
            // the wait reaps it, so its pid is never killed once reused.
            group.set(0);
            if let Ok(child) = &mut child {
                let _ = child.wait();
            }
        })
        .map(|_| guard)
        .map_err(|e| format!("spawning the template thread: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvmfork: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Cmd::Template {
            command:
                TemplateCmd::Build {
                    language,
                    out,
                    ram_mib,
                    verbose,
                    boot_timeout,
                    rebuild,
                    kernel,
                    initrd,
                },
        } => {
            let opts = BuildOptions {
                language: parse_language(&language)?,
                out,
                ram_mib,
                verbose,
                boot_timeout: Duration::from_secs(boot_timeout),
                rebuild,
                kernel,
                initrd,
            };
            let dir = template::build(&opts).map_err(|e| e.to_string())?;
            println!("{}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            command:
                BenchCmd::Fork {
                    language,
                    template: dir,
                    iterations,
                    alive,
                    code,
                    max_exec_alive,
                },
        } => {
            let language = parse_language(&language)?;
            let t = load_template(language, dir)?;
            let alive_counts = alive
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|e| format!("--alive: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let code = code.unwrap_or_else(|| match language {
                Language::Python => "print(1+1)".into(),
                Language::Node => "console.log(1+1)".into(),
            });
            let opts = kvmfork::bench::BenchOptions {
                iterations,
                alive_counts,
                code,
                language,
                max_exec_alive,
            };
            let report = kvmfork::bench::run_fork_bench(std::sync::Arc::new(t), &opts)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            command:
                BenchCmd::Sessions {
                    template: dir,
                    iterations,
                    state_mib,
                    fan_out,
                    hold,
                },
        } => {
            let t = load_template(Language::Python, dir)?;
            let state_mib = state_mib
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|e| format!("--state-mib: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if state_mib.iter().any(|&m| m == 0 || m > 200) {
                return Err("--state-mib values must be between 1 and 200".into());
            }
            kvmfork::bench::raise_nofile_limit();
            let opts = kvmfork::bench_sessions::SessionBenchOptions {
                iterations,
                state_mib,
                fan_out,
                hold,
            };
            let report = kvmfork::bench_sessions::run_session_bench(std::sync::Arc::new(t), &opts)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            server,
            language,
            template: dirs,
            pool_size,
            warm_sandboxes,
            max_sandbox_dirty_mib,
            max_output_bytes,
            sessions,
        } => {
            let config = server.to_config()?;
            // Before any template is built: a missing keys file is refused now.
            kvmfork::server::preflight(&config).map_err(|e| e.to_string())?;
            let sessions = sessions.to_config(max_output_bytes)?;
            let languages = serve_languages(&language)?;
            // What this host's KVM can do, once, before any template uses it.
            eprintln!(
                "kvmfork: host: {}",
                kvmfork::vmm::host::HostCaps::current().describe()
            );
            let mut templates = Vec::new();
            for dir in &dirs {
                let t = template::Template::load(dir)
                    .map_err(|e| format!("loading template {}: {e}", dir.display()))?;
                eprintln!(
                    "kvmfork: serving {} template {}",
                    t.meta.language,
                    dir.display()
                );
                templates.push(t);
            }
            kvmfork::bench::raise_nofile_limit();
            let limits = kvmfork::engine::sandbox::Limits {
                stdout_cap: max_output_bytes,
                stderr_cap: max_output_bytes,
                max_dirty_pages: max_sandbox_dirty_mib * 256,
            };
            let pool = kvmfork::engine::pool::PoolConfig {
                max_idle: pool_size.max(warm_sandboxes),
                prewarm: pool_size.min(1),
                warm: warm_sandboxes,
                limits,
                // Twice what one exec may write.
                recycle_dirty_bytes: (2 * max_sandbox_dirty_mib as u64) << 20,
            };
            // Kills the template builder when the server stops or fails to
            // start (dropped on both ways out of this arm).
            let mut _builder = None;
            let engine = if dirs.is_empty() {
                let registry = std::sync::Arc::new(
                    kvmfork::engine::lane::TemplateRegistry::building(&languages),
                );
                _builder = Some(provision_templates(
                    registry.clone(),
                    config.seccomp,
                    config.user.clone(),
                )?);
                kvmfork::engine::lane::Engine::with_registry(registry, pool)
            } else {
                kvmfork::engine::lane::Engine::new(templates, pool)
            }
            .with_session_config(sessions);
            kvmfork::server::serve(config, std::sync::Arc::new(engine))
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Template {
            command:
                TemplateCmd::Provide {
                    language,
                    user,
                    parent,
                },
        } => provide_templates(&language, user.as_deref(), parent),
        Cmd::Template {
            command: TemplateCmd::Inspect { dir },
        } => {
            print!("{}", template::describe(&dir).map_err(|e| e.to_string())?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Mcp { args } => {
            kvmfork::mcp::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            language,
            timeout,
            template: dir,
            code,
        } => {
            let language = parse_language(&language)?;
            let code = if code == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .map_err(|e| e.to_string())?;
                s
            } else {
                code
            };
            if !(timeout.is_finite() && timeout > 0.0) {
                return Err("--timeout must be a positive number of seconds".into());
            }
            let t = load_template(language, dir)?;
            let mut lane = kvmfork::engine::pool::Pool::new(
                std::sync::Arc::new(t),
                kvmfork::engine::pool::PoolConfig {
                    max_idle: 1,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let req = ExecRequest {
                code,
                language,
                timeout: Duration::from_secs_f64(timeout),
                cancel: CancelToken::new(),
            };
            let r = lane.exec(&req);
            use std::io::Write;
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stderr().write_all(&r.stderr);
            if r.stdout_truncated {
                eprintln!("kvmfork: stdout truncated");
            }
            if let Some(f) = &r.failure {
                eprintln!("kvmfork: {}", kvmfork::engine::describe_failure(f));
                return Ok(ExitCode::from(124));
            }
            Ok(ExitCode::from((r.exit_code & 0xff) as u8))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn serve_languages_default_to_every_language_python_first() {
        assert_eq!(
            serve_languages(&[]).unwrap(),
            vec![Language::Python, Language::Node]
        );
    }

    #[test]
    fn serve_languages_take_repeats_commas_and_aliases() {
        assert_eq!(
            serve_languages(&names(&["node"])).unwrap(),
            vec![Language::Node]
        );
        assert_eq!(
            serve_languages(&names(&["js", "python3", "node"])).unwrap(),
            vec![Language::Node, Language::Python]
        );
        let err = serve_languages(&names(&["cobol"])).unwrap_err();
        assert!(err.contains("--language") && err.contains("cobol"), "{err}");
        assert!(serve_languages(&names(&[""])).is_err());
    }

    #[test]
    fn language_flag_is_repeatable_and_comma_separated() {
        let cli = Cli::try_parse_from(["kvmfork", "serve", "--language", "python,node"]).unwrap();
        let Cmd::Serve { language, .. } = cli.command else {
            panic!("not serve")
        };
        assert_eq!(language, names(&["python", "node"]));
        let cli = Cli::try_parse_from(["kvmfork", "serve", "--language", "node", "--language=py"])
            .unwrap();
        let Cmd::Serve { language, .. } = cli.command else {
            panic!("not serve")
        };
        assert_eq!(language, names(&["node", "py"]));
        assert!(
            Cli::try_parse_from(["kvmfork", "serve", "--language", "node", "--template", "/t"])
                .is_err(),
            "--language and --template conflict"
        );
    }
}

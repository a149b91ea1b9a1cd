//! `kvmfork`: build templates, run code in sandboxes, benchmark forks, serve the API.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use kvmfork::api::{CancelToken, ExecRequest, Language};
use kvmfork::template::{self, BuildOptions};

#[derive(Parser)]
#[command(
    name = "kvmfork",
    version,
    about = "Copy-on-write KVM sandboxes for running untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
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
    /// Serve the HTTP API (builds the default Python template first if none is cached).
    Serve {
        #[command(flatten)]
        server: kvmfork::server::ServeArgs,
        /// Template directories to serve (default: every cached template; the
        /// Python one is built if missing).
        #[arg(long)]
        template: Vec<PathBuf>,
        /// Idle pre-created VMs kept per worker and template.
        #[arg(long, default_value_t = 2)]
        pool_size: usize,
        /// Most guest memory one exec may dirty, in MiB (copy-on-write host memory).
        #[arg(long, default_value_t = 256)]
        max_sandbox_dirty_mib: usize,
        /// Most bytes of stdout (and of stderr) returned per exec.
        #[arg(long, default_value_t = 1 << 20)]
        max_output_bytes: u32,
        #[command(flatten)]
        sessions: kvmfork::engine::session::SessionArgs,
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

/// Every cached template; the Python one is built (with progress) if missing.
fn default_templates() -> Result<Vec<PathBuf>, String> {
    let mut dirs = Vec::new();
    match template::find_cached(Language::Python) {
        Some(d) => dirs.push(d),
        None => {
            eprintln!("kvmfork: no Python template cached yet; building it (one-time, minutes on PVM hosts)");
            let opts = BuildOptions {
                language: Language::Python,
                out: None,
                ram_mib: 512,
                verbose: false,
                boot_timeout: Duration::from_secs(3600),
                rebuild: false,
                kernel: None,
                initrd: None,
            };
            dirs.push(template::build(&opts).map_err(|e| e.to_string())?);
        }
    }
    if let Some(d) = template::find_cached(Language::Node) {
        dirs.push(d);
    }
    Ok(dirs)
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
        Cmd::Serve {
            server,
            template: dirs,
            pool_size,
            max_sandbox_dirty_mib,
            max_output_bytes,
            sessions,
        } => {
            let config = server.to_config()?;
            let sessions = sessions.to_config(max_output_bytes)?;
            let dirs = if dirs.is_empty() {
                default_templates()?
            } else {
                dirs
            };
            let mut templates = Vec::new();
            for dir in dirs {
                let t = template::Template::load(&dir)
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
                max_idle: pool_size,
                prewarm: pool_size.min(1),
                limits,
            };
            let engine = kvmfork::engine::lane::Engine::with_sessions(templates, pool, sessions);
            kvmfork::server::serve(config, std::sync::Arc::new(engine))
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Template {
            command: TemplateCmd::Inspect { dir },
        } => {
            print!("{}", template::describe(&dir).map_err(|e| e.to_string())?);
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

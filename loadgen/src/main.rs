//! `loadgen` binary: parse flags, run, print the report, draw the plot.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use loadgen::cli::Args;
use loadgen::report::Report;
use loadgen::{plot, Mode};

/// File descriptors needed besides the connections (stdio, epoll, plot file).
const SPARE_FDS: u64 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.to_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    match loadgen::raise_nofile_limit() {
        Ok(limit) if limit < config.connections as u64 + SPARE_FDS => {
            eprintln!(
                "loadgen: open-files limit {limit} is too low for {} connections; raise `ulimit -n`",
                config.connections
            );
            return ExitCode::from(2);
        }
        Ok(_) => {}
        Err(e) => eprintln!("loadgen: cannot read the open-files limit: {e}"),
    }
    if let Err(e) = loadgen::stop_on_interrupt(&config.stop) {
        eprintln!("loadgen: cannot install the SIGINT handler: {e}");
    }
    let result = match loadgen::run(&config) {
        Ok(result) => result,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let report = Report::new(&config, &result);
    let text = if args.json {
        report.to_json() + "\n"
    } else {
        report.to_text()
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("loadgen: cannot write the report: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} {} - {:.0} req/s, {} connections",
            report.config.target,
            if report.config.rate.is_some() {
                "open loop"
            } else {
                "closed loop"
            },
            report.throughput_rps,
            report.config.connections
        );
        let mut series = vec![plot::Series {
            label: if matches!(config.mode, Mode::Open { .. }) {
                "latency (from intended send)"
            } else {
                "latency"
            },
            histogram: &result.recorder.latency,
        }];
        if matches!(config.mode, Mode::Open { .. }) {
            series.push(plot::Series {
                label: "service time (from actual send)",
                histogram: &result.recorder.service_time,
            });
        }
        if let Err(e) = plot::render(path, &title, &series, args.plot_font.as_deref()) {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    }
    // A run in which nothing succeeded is a failure for scripts.
    if result.recorder.ok == 0 {
        eprintln!("loadgen: no successful (2xx) responses");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

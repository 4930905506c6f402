//! `weft-demo`: see the library docs (`weft_demo`) for what a run does.

use std::process::ExitCode;

use clap::Parser;
use weft_demo::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match weft_demo::run::run(&cli) {
        Ok(report) => {
            print!("{}", report.text());
            if let Some(path) = &cli.json_out
                && let Err(e) = std::fs::write(path, report.json().to_string())
            {
                eprintln!("weft-demo: error: writing {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            if report.leftovers.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("weft-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

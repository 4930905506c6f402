//! `weft-demo-app`: the small HTTP service and load generator used by tests and the demo.
//!
//! `serve` answers HTTP/1.1 (keep-alive, Content-Length) with a thread per connection and can
//! call other services for each request; `load` drives a URL with a fixed number of requests.

mod http;
mod load;
mod serve;
mod traceparent;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "weft-demo-app", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve HTTP, optionally calling downstream services for each request.
    Serve(serve::ServeArgs),
    /// Send a fixed number of requests and print a JSON summary.
    Load(load::LoadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(args) => serve::run(args).map(|()| true),
        Cmd::Load(args) => load::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-demo-app: {e:#}");
            ExitCode::from(2)
        }
    }
}

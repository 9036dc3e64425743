//! The `saleslayer-operator` binary: parses the command line and hands each
//! subcommand to its module.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use saleslayer_operator::cli::{Cli, Command};

/// Exit code of a subcommand whose issue has not landed yet.
const NOT_YET: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, issue) = match cli.command {
        Command::Crd => return print_crd(),
        Command::Run(_) => ("run", 3),
        Command::Proxy(_) => ("proxy", 7),
        Command::Simulate(_) => ("simulate", 7),
    };
    eprintln!("saleslayer-operator {name}: not built yet (tracked in issue #{issue})");
    ExitCode::from(NOT_YET)
}

fn print_crd() -> ExitCode {
    match saleslayer_operator::api::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("saleslayer-operator crd: {error}");
            ExitCode::FAILURE
        }
    }
}

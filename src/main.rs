//! The `lora-dash` binary: parse, run, print the error chain, pick the exit code.

use clap::Parser;

fn main() {
    lora_dash::runtime::init();
    let cli = lora_dash::cli::Cli::parse();
    if let Err(e) = lora_dash::cli::run(cli) {
        eprintln!("error: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}

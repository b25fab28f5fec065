//! `pagestream`: the command-line tool.

mod bench_cmd;
mod codec_cmd;
mod demo;
mod progress;
mod shim_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "pagestream",
    version,
    about = "Fast, verified live migration of virtual machine memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Migrate a generated guest memory image through the page codec and show what it does.
    Demo(demo::DemoArgs),
    /// The page codec: make test images, measure it against zstd and LZ4.
    #[command(subcommand)]
    Codec(codec_cmd::CodecCommand),
    /// End-to-end benchmarks against their baselines.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Carry QEMU's live migration: `shim send` on the source host, `shim recv` on the
    /// destination host.
    #[command(subcommand)]
    Shim(shim_cmd::ShimCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Codec(cmd) => codec_cmd::run(cmd),
        Command::Bench(cmd) => bench_cmd::run(cmd),
        Command::Shim(cmd) => shim_cmd::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pagestream: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

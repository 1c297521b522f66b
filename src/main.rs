//! The `rewind` command line: a thin layer over the library.

use clap::{Parser, Subcommand};
use rewind::cli;

/// Counts heap bytes so `rewind bench` can report activation memory exactly.
#[global_allocator]
static ALLOCATOR: rewind::memory::CountingAlloc = rewind::memory::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "rewind",
    version,
    about = "Serve and fine-tune time-reversible LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch a known model (default: SmolLM2-135M-Instruct) into the models directory.
    Pull(cli::pull::PullArgs),
    /// Print the completion of a one-turn chat.
    Generate(cli::generate::GenerateArgs),
    /// Interactive chat in the terminal, streamed.
    Chat(cli::generate::ChatArgs),
    /// Fine-tune a model on a JSONL file (activation-free reversible backprop by default).
    Train(cli::train::TrainArgs),
    /// Serve models through the OpenAI HTTP API.
    Serve(cli::serve::ServeArgs),
    /// Convert a pretrained model into a reversible one by staged distillation.
    Convert(cli::convert::ConvertArgs),
    /// Compare a model with a reference: KL, cross-entropy, agreement, inverse error, answers.
    Eval(cli::convert::EvalArgs),
    /// Benchmarks (training memory and speed, generation throughput).
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
}

fn main() {
    rewind::memory::retain_freed_heap();
    cli::init_tracing();
    rewind::memory::mark_installed();
    // The CPU kernels' probe forks: run it before any thread, lock or socket exists.
    rewind::kernels::isa::Isa::best();
    let result = match Cli::parse().command {
        Command::Pull(args) => cli::pull::run(args),
        Command::Generate(args) => cli::generate::run_generate(args),
        Command::Chat(args) => cli::generate::run_chat(args),
        Command::Train(args) => cli::train::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Bench(command) => cli::bench::run(command),
        Command::Convert(args) => cli::convert::run_convert(args),
        Command::Eval(args) => cli::convert::run_eval(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

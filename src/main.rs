use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc leaves the untouched part of a buffer untouched, and gives
/// freed memory back in time: with tens of thousands of connections, the
/// buffers of the ones on hyper (the internal listener, and public
/// connections that sent a body) cost resident memory only for the bytes
/// really written to them (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PNS_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = pns::cli::Cli::parse();
    match pns::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pns: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc leaves the untouched part of a buffer untouched, and gives
/// freed memory back in time: with tens of thousands of connections, the
/// buffers of the ones on hyper (the internal listener, and public
/// connections that sent a body) cost resident memory only for the bytes
/// really written to them (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them). Each thread's cache of freed blocks
/// is twice the default size and is not trimmed as the thread allocates:
/// a message is allocated on the ingest thread and freed on the polls'
/// thread, and the trimming sent the blocks back to the arena only for the
/// next allocations to fetch them again. Server CPU per notify at 1,000 a
/// second went down 3–7 % at the medians of three sets of pairs of rounds,
/// less than it spreads between runs (docs/benchmarks/NOTES.md, ²⁷).
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: JemallocOptions =
    JemallocOptions(c"experimental_tcache_gc:false,lg_tcache_nslots_mul:2".as_ptr());

/// A C string for jemalloc to read: `const char *malloc_conf`.
#[repr(transparent)]
struct JemallocOptions(*const std::ffi::c_char);

// SAFETY: it points to a string literal, which is never written.
unsafe impl Sync for JemallocOptions {}

fn main() -> std::process::ExitCode {
    // The main runtime holds the public polls. The ingest thread (the
    // internal listener and the SQLite writer), SQLite's own threads and the
    // accepting thread take a core between them, so by default the polls get
    // the others, and at least two where there are two cores: a burst's
    // deliveries then run on both cores instead of one while the other
    // waits for them (docs/benchmarks/NOTES.md, ³³). TOKIO_WORKER_THREADS still
    // decides when it is set. On one core it is a current-thread runtime:
    // the same one thread as a multi-thread runtime of one worker, without
    // the machinery for sharing work between workers.
    let workers = match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(n) => match n.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("pns: TOKIO_WORKER_THREADS must be a whole number above 0, not {n:?}");
                return std::process::ExitCode::FAILURE;
            }
        },
        Err(_) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.saturating_sub(1).max(cores.min(2))
        }
    };
    let mut runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        multi.worker_threads(workers);
        multi
    };
    runtime.enable_all();
    match runtime.build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("pns: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
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
            eprintln!("pns: {}", pns::cli::describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

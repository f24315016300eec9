//! `rrr serve FILE.pftrace [--port 9001]`: serves a trace on 127.0.0.1 the way the Perfetto UI
//! fetches one, and prints the link that opens it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rrr_perfetto::TraceServer;

#[derive(clap::Args)]
pub struct Args {
    /// The trace (`rrr trace`, `rrr replay --trace`).
    pub trace: PathBuf,
    /// The port to listen on. The UI's content-security policy lets it fetch only from port
    /// 9001; another port suits scripts and tests.
    #[arg(long, default_value_t = rrr_perfetto::DEFAULT_PORT)]
    pub port: u16,
}

pub fn run(args: Args) -> Result<i32> {
    serve(&args.trace, args.port)
}

pub fn serve(trace: &Path, port: u16) -> Result<i32> {
    let server = TraceServer::bind(trace, port)
        .with_context(|| format!("cannot serve {}", trace.display()))?;
    let bound = server.local_addr().port();
    println!("rrr: serving {} at {}", trace.display(), server.trace_url());
    println!("rrr: open {}", server.ui_link());
    if bound != rrr_perfetto::DEFAULT_PORT {
        println!(
            "rrr: note: the Perfetto UI fetches only from port {}; with port {bound} open the trace by hand (Open trace file) or fetch it with a script",
            rrr_perfetto::DEFAULT_PORT
        );
    }
    println!("rrr: Ctrl-C stops the server");
    server.run()?;
    Ok(0)
}

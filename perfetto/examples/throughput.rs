//! Writer throughput: `cargo run --release -p rrr-perfetto --example throughput -- [EVENTS]`.
//! Writes nested call slices with three typed arguments each (a name from a small set, as a
//! kernel trace repeats function names) to a temporary file and reports events per second and
//! bytes per event.

use std::time::Instant;

use rrr_perfetto::{Arg, TraceWriter, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(2_000_000);
    let names: Vec<String> = (0..5000).map(|i| format!("kernel_function_{i}")).collect();
    let files: Vec<String> = (0..100).map(|i| format!("/tmp/file{i}")).collect();
    let dir = std::env::temp_dir().join(format!("rrr-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("t.pftrace");
    let started = Instant::now();
    let mut w = TraceWriter::create(&path)?;
    let tracks: Vec<_> = (1..=8)
        .map(|tid| w.thread(1, tid, &format!("task{tid}")))
        .collect::<Result<_, _>>()?;
    let mut ts = 0u64;
    let mut written = 0u64;
    let mut i = 0usize;
    while written < events {
        let track = tracks[i % tracks.len()];
        // Four nested calls, then their four returns.
        for d in 0..4 {
            ts += 50;
            let args = [
                Arg::new("fd", Value::Int(d)),
                Arg::new("buf", Value::Pointer(0xffff_8880_0000_0000 + ts)),
                Arg::new("name", Value::Str(&files[(i + d as usize) % files.len()])),
            ];
            w.begin(ts, track, &names[(i * 7 + d as usize) % names.len()], &args)?;
        }
        for _ in 0..4 {
            ts += 50;
            w.end(ts, track, &[Arg::new("ret", Value::Int(0))])?;
        }
        written += 8;
        i += 1;
    }
    let stats = w.stats();
    w.finish()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} events in {secs:.2} s: {:.2} M events/s, {:.1} bytes/event, {:.0} MB",
        stats.events,
        stats.events as f64 / secs / 1e6,
        stats.bytes as f64 / stats.events as f64,
        stats.bytes as f64 / 1e6
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

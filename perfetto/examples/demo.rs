//! Writes a small synthetic trace (two guest tasks, nested syscall and kernel-function slices
//! with typed arguments, a task switch as a flow, a counter) and serves it to the Perfetto UI:
//! `cargo run -p rrr-perfetto --example demo -- [FILE.pftrace] [--no-serve]`.
//!
//! The events are made up; the point is to see the writer's output in the real UI.

use std::path::PathBuf;

use rrr_perfetto::{Arg, Event, Kind, TraceServer, TraceWriter, Value, DEFAULT_PORT};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = !args.iter().any(|a| a == "--no-serve");
    let path = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("demo.pftrace"));

    let mut w = TraceWriter::create(&path)?;
    w.process(42, Some("stimulus"))?;
    let main = w.thread(42, 42, "stimulus")?;
    let worker = w.thread(42, 43, "worker")?;
    let ring = w.counter_track("probe ring fill", Some("events"), None)?;
    let mut t = 1_000_000u64;
    for i in 0..50u64 {
        let fd = 3 + (i % 4) as i64;
        let name = format!("/tmp/file{}", i % 4);
        w.event(
            &Event::new(t, main, Kind::Begin("openat"))
                .category("syscall")
                .args(&[
                    Arg::new("dfd", Value::Int(-100)),
                    Arg::new("filename", Value::Str(&name)),
                    Arg::new("flags", Value::Str("O_WRONLY|O_CREAT")),
                    Arg::new("mode", Value::Uint(0o644)),
                ]),
        )?;
        w.begin(
            t + 200,
            main,
            "do_sys_openat2",
            &[
                Arg::new("dfd", Value::Int(-100)),
                Arg::new("filename", Value::Str(&name)),
                Arg::new("how", Value::Pointer(0xffff_c900_0001_3e58)),
            ],
        )?;
        w.begin(t + 400, main, "getname", &[])?;
        w.end(
            t + 900,
            main,
            &[Arg::new("ret", Value::Pointer(0xffff_8880_0412_0000))],
        )?;
        w.end(t + 4_000, main, &[Arg::new("ret", Value::Int(fd))])?;
        w.end(t + 4_200, main, &[Arg::new("ret", Value::Int(fd))])?;
        w.counter(t + 4_200, ring, (i as i64 * 37) % 500)?;
        // A switch to the worker, drawn as a flow between the two threads.
        let flow = [i + 1];
        w.event(&Event::new(t + 5_000, main, Kind::Instant("switch out")).flows(&flow))?;
        w.event(
            &Event::new(t + 5_100, worker, Kind::Begin("write"))
                .category("syscall")
                .terminating_flows(&flow)
                .args(&[
                    Arg::new("fd", Value::Int(fd)),
                    Arg::new("count", Value::Uint(4096)),
                    Arg::new("nonblock", Value::Bool(false)),
                ]),
        )?;
        w.end(t + 9_000, worker, &[Arg::new("ret", Value::Int(4096))])?;
        t += 10_000;
    }
    let stats = w.stats();
    w.finish()?;
    println!(
        "wrote {} ({} events, {} bytes, {:.1} bytes/event)",
        path.display(),
        stats.events,
        stats.bytes,
        stats.bytes as f64 / stats.events as f64
    );
    if serve {
        let server = TraceServer::bind(&path, DEFAULT_PORT)?;
        println!("open {}", server.ui_link());
        server.run()?;
    }
    Ok(())
}

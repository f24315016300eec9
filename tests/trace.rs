//! The trace pass end to end: a stimulus is recorded and traced (`rrr record --trace`), the
//! trace is decoded with Google's own `perfetto` classes (`perfetto/tests/check_trace.py`, which
//! also enforces Perfetto's rules), and what it shows is checked against what the stimulus did.
//! The traced replay must pass every check a plain replay passes (the transparency check), and
//! `rrr serve` is driven by a real HTTP client the way the UI fetches a trace.
//!
//! The VMs run in the carrier where this host's KVM is software-only.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;

const RRR: &str = env!("CARGO_BIN_EXE_rrr");

/// The tests that start VMs take the machine one at a time (two cores, see DESIGN.md).
static MACHINE: Mutex<()> = Mutex::new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("trace-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rrr(args: &[&str]) -> std::process::Output {
    Command::new(RRR)
        .args(args)
        .output()
        .expect("cannot start rrr")
}

/// `rrr record` of `open_write_close.c` into `rec`, quietly, with `more` arguments after.
fn record_open_write_close(rec: &Path, more: &[&str]) -> std::process::Output {
    let stimulus = root().join("examples/stimuli/open_write_close.c");
    let mut args = vec![
        "record",
        stimulus.to_str().unwrap(),
        "-o",
        rec.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(more);
    rrr(&args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The trace decoded by Google's classes; panics with the broken rule if there is one.
fn decode(trace: &Path) -> Value {
    let out = Command::new("python3")
        .arg(root().join("perfetto/tests/check_trace.py"))
        .arg(trace)
        .output()
        .expect("python3 is needed to decode traces (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "the trace breaks Perfetto's rules or does not decode:\n{}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check_trace.py prints JSON")
}

/// One slice: its name, category, arguments at the beginning and at the end, depth on its
/// track, and the slices opened inside it.
#[derive(Debug, Clone)]
struct Slice {
    name: String,
    category: String,
    args: Value,
    end_args: Value,
    depth: usize,
    children: Vec<Slice>,
}

/// The slices of one track, nested as the trace nests them.
fn slices(events: &[Value], track: u64) -> Vec<Slice> {
    let mut roots = Vec::new();
    let mut open: Vec<Slice> = Vec::new();
    for e in events.iter().filter(|e| e["uuid"] == track) {
        match e["type"].as_str().unwrap() {
            "TYPE_SLICE_BEGIN" => open.push(Slice {
                name: e["name"].as_str().unwrap().into(),
                category: e["cats"][0].as_str().unwrap_or("").into(),
                args: e["args"].clone(),
                end_args: Value::Null,
                depth: open.len(),
                children: Vec::new(),
            }),
            "TYPE_SLICE_END" => {
                let mut done = open.pop().expect("check_trace.py checked the nesting");
                done.end_args = e["args"].clone();
                match open.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => roots.push(done),
                }
            }
            _ => {}
        }
    }
    roots.extend(open);
    roots
}

fn names(slices: &[Slice]) -> Vec<&str> {
    slices.iter().map(|s| s.name.as_str()).collect()
}

fn flatten(slices: &[Slice], out: &mut Vec<Slice>) {
    for s in slices {
        out.push(s.clone());
        flatten(&s.children, out);
    }
}

fn str_arg<'a>(args: &'a Value, name: &str) -> &'a str {
    args[name]["str"].as_str().unwrap_or("")
}

fn int_arg(args: &Value, name: &str) -> Option<i64> {
    args[name]["int"]
        .as_i64()
        .or_else(|| args[name]["uint"].as_u64().map(|v| v as i64))
}

#[test]
fn a_traced_recording_shows_its_system_calls_and_kernel_calls_and_replays_unchanged() {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir("semantic");
    let rec = dir.join("ow.rrr");
    let trace = dir.join("ow.pftrace");
    let out = record_open_write_close(
        &rec,
        &["--trace", "--trace-output", trace.to_str().unwrap()],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "rrr record --trace failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    // The transparency check: the traced replay passed every checkpoint and ended with the
    // recording's console, verdict and final state hash.
    assert!(
        stdout.contains("rrr: the replay matches the recording")
            && stdout.contains("the final state"),
        "the traced replay did not match its recording:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("rrr: the trace is {}", trace.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("https://ui.perfetto.dev/#!/?url=http://127.0.0.1:9001/ow.pftrace"),
        "{stdout}"
    );

    let decoded = decode(&trace);
    let tracks = decoded["tracks"].as_array().unwrap();
    let events = decoded["events"].as_array().unwrap();
    assert!(
        events.len() > 10_000,
        "a whole-kernel trace has many events: {}",
        events.len()
    );
    let threads: Vec<&Value> = tracks.iter().filter(|t| t.get("tid").is_some()).collect();
    assert!(
        threads
            .iter()
            .all(|t| !t["name"].as_str().unwrap_or("").is_empty()),
        "every thread is named by its comm: {threads:?}"
    );
    // The stimulus's thread: the one whose system calls open our file.
    let mut found = None;
    for t in &threads {
        let uuid = t["uuid"].as_u64().unwrap();
        let roots = slices(events, uuid);
        let mut all = Vec::new();
        flatten(&roots, &mut all);
        if all.iter().any(|s| {
            s.category == "syscall" && str_arg(&s.args, "filename").contains("rrr-trace-probe.txt")
        }) {
            found = Some((t, all));
        }
    }
    let (thread, all) = found.expect("a thread whose openat names rrr-trace-probe.txt");
    assert_ne!(thread["tid"], 0);
    let calls: Vec<&Slice> = all.iter().filter(|s| s.category == "syscall").collect();
    let open_at = calls
        .iter()
        .position(|s| {
            s.name == "openat" && str_arg(&s.args, "filename").contains("rrr-trace-probe.txt")
        })
        .unwrap();
    let open = calls[open_at];
    let fd = int_arg(&open.end_args, "return").expect("openat's return value");
    assert!(fd >= 3, "openat returned {fd}: {open:?}");
    assert_eq!(int_arg(&open.args, "nr"), Some(257), "{open:?}");
    // Each system call names the place in the program that made it: the stimulus's own line,
    // found above the C library's wrapper on the user stack.
    let from = str_arg(&open.args, "from");
    assert!(
        from.starts_with("write_probe_file+") && from.contains("(open_write_close.c:15) via "),
        "openat made from open_write_close.c:15 {open:?}"
    );
    let rest: Vec<&&Slice> = calls[open_at + 1..].iter().collect();
    let write = rest
        .iter()
        .find(|s| s.name == "write")
        .expect("a write after the open");
    assert_eq!(int_arg(&write.args, "fd"), Some(fd), "{write:?}");
    assert_eq!(int_arg(&write.args, "count"), Some(14), "{write:?}");
    assert_eq!(int_arg(&write.end_args, "return"), Some(14), "{write:?}");
    let close = rest
        .iter()
        .find(|s| s.name == "close")
        .expect("a close after the write");
    assert_eq!(int_arg(&close.args, "fd"), Some(fd), "{close:?}");
    assert_eq!(int_arg(&close.end_args, "return"), Some(0), "{close:?}");
    assert!(
        str_arg(&write.args, "from").contains("(open_write_close.c:20) via "),
        "{write:?}"
    );
    assert!(
        str_arg(&close.args, "from").contains("(open_write_close.c:24) via "),
        "{close:?}"
    );
    let order: Vec<&str> = rest
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| ["write", "close"].contains(n))
        .collect();
    assert_eq!(&order[..2], ["write", "close"]);
    let missing = rest
        .iter()
        .find(|s| {
            s.name == "openat" && str_arg(&s.args, "filename").contains("rrr-trace-missing.txt")
        })
        .expect("the open of the missing file");
    assert_eq!(
        int_arg(&missing.end_args, "return"),
        Some(-2),
        "{missing:?}"
    );
    assert_eq!(str_arg(&missing.end_args, "errno"), "ENOENT", "{missing:?}");

    // The stimulus's own functions, from their -finstrument-functions hooks: main calls
    // write_probe_file (from line 33), which makes the open, the write and the close.
    let main = all
        .iter()
        .find(|s| s.category == "stimulus" && s.name == "main")
        .unwrap_or_else(|| panic!("no main: {:?}", names(&all)));
    let wrote = main
        .children
        .iter()
        .find(|s| s.category == "stimulus" && s.name == "write_probe_file")
        .unwrap_or_else(|| panic!("no write_probe_file under main: {main:?}"));
    assert!(
        str_arg(&wrote.args, "from").starts_with("main+")
            && str_arg(&wrote.args, "from").ends_with("(open_write_close.c:33)"),
        "{wrote:?}"
    );
    let mut inside = Vec::new();
    flatten(&wrote.children, &mut inside);
    let under: Vec<&str> = inside
        .iter()
        .filter(|s| s.category == "syscall")
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(under, ["openat", "write", "close"], "{wrote:?}");
    // It ended at its own exit hook, with its position.
    assert!(
        str_arg(&wrote.end_args, "position").contains(':'),
        "{:?}",
        wrote.end_args
    );
    assert!(
        !names(&main.children).contains(&"openat"),
        "the open is under write_probe_file, not main"
    );

    // Under the system call, the kernel's own functions, with their typed arguments.
    let mut inside = Vec::new();
    flatten(&open.children, &mut inside);
    let do_open = inside
        .iter()
        .find(|s| s.name == "do_sys_openat2")
        .unwrap_or_else(|| {
            panic!(
                "do_sys_openat2 under openat: {:?}",
                inside.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert!(do_open.depth > open.depth);
    assert!(
        str_arg(&do_open.args, "filename").contains("rrr-trace-probe.txt"),
        "{do_open:?}"
    );
    assert_eq!(
        int_arg(&do_open.args, "dfd"),
        Some(-100),
        "AT_FDCWD: {do_open:?}"
    );
    assert!(
        do_open.args["how (struct open_how *)"]["ptr"]
            .as_u64()
            .unwrap_or(0)
            > 0xffff_8000_0000_0000,
        "a struct pointer is named with its type and shown as a kernel address: {do_open:?}"
    );
    assert_eq!(
        int_arg(&do_open.end_args, "return"),
        Some(fd),
        "{do_open:?}"
    );
    assert_eq!(do_open.category, "fs");

    // Every entry and return says where it happened in the replay (for gdb's `monitor goto`):
    // after which exit, at which address, and the how-many-th arrival there since that exit.
    let position = |args: &Value| -> (u64, u64, u64) {
        let text = str_arg(args, "position");
        let parts: Vec<&str> = text.split(':').collect();
        assert_eq!(parts.len(), 3, "position {text:?}");
        let exits = parts[0].parse().expect("an exit count");
        let rip = u64::from_str_radix(parts[1].trim_start_matches("0x"), 16).expect("an address");
        let hits = parts[2].parse().expect("a hit count");
        (exits, rip, hits)
    };
    let (open_exits, open_rip, open_hits) = position(&open.args);
    let (entry_exits, entry_rip, entry_hits) = position(&do_open.args);
    assert!(open_exits > 0 && open_hits >= 1, "{open:?}");
    assert!(entry_hits >= 1, "{do_open:?}");
    assert!(
        open_exits <= entry_exits,
        "positions go forward: {open:?} {do_open:?}"
    );
    assert!(
        open_rip > 0xffff_ffff_8000_0000 && entry_rip > 0xffff_ffff_8000_0000,
        "probes are in kernel text: {do_open:?}"
    );
    assert!(
        do_open.end_args.get("position").is_none(),
        "returns carry no position: {do_open:?}"
    );
}

/// The in-guest probes: most calls are recorded by stubs without an exit, and a buffer so small
/// that it fills at almost every call (each time an exit drains it) gives the same trace. The
/// trace is the same written natively after a replay in the carrier (what `rrr replay` does
/// here) and written by the replaying process itself (what it does on a VT-x/AMD-V host, run
/// here as `rrr carrier run -- rrr replay`).
#[test]
fn calls_recorded_in_the_guest_give_the_same_trace_however_often_the_buffer_fills() {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir("stubs");
    let rec = dir.join("sys.rrr");
    let out = record_open_write_close(&rec, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let trace = |name: &str, capacity: Option<&str>, in_process: bool| -> (Value, u64) {
        let output = dir.join(format!("{name}.pftrace"));
        let run_dir = dir.join(name);
        let mut cmd = Command::new(RRR);
        if in_process {
            // The carrier shares the working directory (cargo runs tests in the package root,
            // which holds the rrr binary and the test directory) and sees the host's `/tmp` as
            // its own: a clone under `/tmp` works too.
            cmd.args([
                "carrier",
                "run",
                "--share",
                dir.to_str().unwrap(),
                "--",
                RRR,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        }
        cmd.args(["replay", rec.to_str().unwrap(), "--quiet", "--trace"])
            .args(["--trace-output", output.to_str().unwrap()])
            .args(["--run-dir", run_dir.to_str().unwrap()]);
        if let Some(capacity) = capacity {
            cmd.env("RRR_TRACE_STUB_CAPACITY", capacity);
        }
        let out = cmd.output().expect("cannot start rrr");
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("the replay matches the recording"),
            "{stdout}\n{}",
            text(&out.stderr)
        );
        let summary: Value =
            serde_json::from_slice(&std::fs::read(run_dir.join("summary.json")).unwrap()).unwrap();
        let size = std::fs::metadata(&output).unwrap().len();
        (summary["rr"]["trace"].clone(), size)
    };
    let (roomy, roomy_size) = trace("roomy", None, false);
    let (tiny, tiny_size) = trace("tiny", Some("4"), false);
    let (direct, direct_size) = trace("in-process", None, true);
    let n = |t: &Value, k: &str| t[k].as_u64().unwrap_or_else(|| panic!("no {k} in {t}"));
    assert!(
        n(&roomy, "stub_sites") > 10 * n(&roomy, "halt_sites"),
        "most probes are stubs: {roomy}"
    );
    assert!(
        n(&roomy, "stub_records") > n(&roomy, "entries") / 2,
        "most calls were recorded in the guest: {roomy}"
    );
    assert_eq!(n(&roomy, "full_drains"), 0, "{roomy}");
    for t in [&roomy, &tiny, &direct] {
        assert_eq!(
            n(t, "uncaptured_reads"),
            0,
            "the trace read only what the observer read at each event: {t}"
        );
    }
    assert!(
        n(&tiny, "full_drains") > n(&tiny, "stub_records") / 8,
        "a 4-record buffer fills all the time: {tiny}"
    );
    for k in [
        "stub_records",
        "entries",
        "returns",
        "syscalls",
        "events",
        "tasks",
        "switches",
    ] {
        assert_eq!(n(&roomy, k), n(&tiny, k), "{k}: {roomy} {tiny}");
        assert_eq!(n(&roomy, k), n(&direct, k), "{k}: {roomy} {direct}");
    }
    assert_eq!(roomy_size, tiny_size, "the same trace size");
    assert_eq!(roomy_size, direct_size, "the same trace size");
    assert!(
        roomy.get("write_ns").is_some() && direct.get("write_ns").is_none(),
        "written after the carrier, and by the replay: {roomy} {direct}"
    );
}

#[test]
fn filters_choose_what_is_traced_and_one_that_matches_nothing_says_so() {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir("filters");
    let rec = dir.join("hello.rrr");
    let out = record_open_write_close(&rec, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let started = std::time::Instant::now();
    let out = rrr(&[
        "trace",
        rec.to_str().unwrap(),
        "--function",
        "no_such_function_*",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no traceable kernel function matches the filters"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "refused before any VM started"
    );

    // A kernel other than the recording's is refused, saying which one to pass.
    let carrier = rrr(&["kernel", "build", "--carrier"]);
    assert!(carrier.status.success(), "{}", text(&carrier.stderr));
    let other = text(&carrier.stdout).trim().to_owned();
    let out = rrr(&["trace", rec.to_str().unwrap(), "--kernel", &other]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("another kernel") && err.contains("pass --kernel"),
        "{err}"
    );

    let trace = dir.join("fs.pftrace");
    let out = rrr(&[
        "trace",
        rec.to_str().unwrap(),
        "--source",
        "fs/",
        "--depth",
        "3",
        "--trace-output",
        trace.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("rrr: the replay matches the recording"),
        "{stdout}"
    );
    let decoded = decode(&trace);
    let events = decoded["events"].as_array().unwrap();
    let begins: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "TYPE_SLICE_BEGIN")
        .collect();
    assert!(!begins.is_empty());
    for e in &begins {
        let cat = e["cats"][0].as_str().unwrap_or("");
        // The system calls and the stimulus's own functions are the layers above the kernel's
        // and stay whatever the filter.
        assert!(
            cat == "syscall" || cat == "fs" || cat == "stimulus",
            "only fs/, system calls and the stimulus's functions: {e}"
        );
    }
    for t in decoded["tracks"].as_array().unwrap() {
        let depth = slices(events, t["uuid"].as_u64().unwrap());
        let mut all = Vec::new();
        flatten(&depth, &mut all);
        assert!(
            all.iter().all(|s| s.depth < 3),
            "--depth 3 keeps three levels"
        );
    }
}

/// `rrr serve` answered with a real HTTP client the way the Perfetto UI asks.
#[test]
fn rrr_serve_answers_as_the_perfetto_ui_expects() {
    let dir = test_dir("serve");
    let trace = dir.join("t.pftrace");
    std::fs::write(&trace, b"\x0a\x00trace bytes").unwrap();
    let mut child = Command::new(RRR)
        .args(["serve", trace.to_str().unwrap(), "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start rrr serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first
        .split(" at ")
        .nth(1)
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .to_owned();
    let link = lines.next().unwrap().unwrap();
    assert!(
        link.contains("https://ui.perfetto.dev/#!/?url=http://127.0.0.1:"),
        "{link}"
    );
    let base = url.trim_end_matches("/t.pftrace").to_owned();

    let agent = ureq::AgentBuilder::new().build();
    let got = agent
        .get(&url)
        .set("Origin", "https://ui.perfetto.dev")
        .call()
        .expect("GET the trace");
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.header("Access-Control-Allow-Origin"),
        Some("https://ui.perfetto.dev")
    );
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut got.into_reader(), &mut body).unwrap();
    assert_eq!(body, std::fs::read(&trace).unwrap());

    let preflight = agent
        .request("OPTIONS", &url)
        .set("Origin", "https://ui.perfetto.dev")
        .set("Access-Control-Request-Method", "GET")
        .call()
        .expect("the preflight");
    assert_eq!(preflight.status(), 204);

    match agent.post(&format!("{base}/status")).send_string("") {
        Err(ureq::Error::Status(404, r)) => assert_eq!(
            r.header("Access-Control-Allow-Origin"),
            Some("https://ui.perfetto.dev")
        ),
        other => panic!(
            "POST /status must be 404 so the UI does not take us for trace_processor: {other:?}"
        ),
    }
    assert!(matches!(
        agent.get(&format!("{base}/other.pftrace")).call(),
        Err(ureq::Error::Status(404, _))
    ));
    child.kill().unwrap();
    child.wait().unwrap();

    // A port in use is named, with what to do.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = rrr(&["serve", trace.to_str().unwrap(), "--port", &port]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("port {port}")) && err.contains("in use") && err.contains("--port"),
        "{err}"
    );
    let out = rrr(&["serve", dir.join("missing.pftrace").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("missing.pftrace"));
}

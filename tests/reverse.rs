//! Reverse execution under real GNU gdb (`rrr replay REC --gdb`): a recording of a stimulus that
//! opens, writes and closes a file is replayed; gdb stops in `fd_install` (the first file the
//! replay opens: the agent's `/dev/vdb`), watches the kernel's count of open files
//! (`nr_files`), and `reverse-continue`s to the instruction that last wrote it (in
//! `alloc_empty_file`), names positions with `monitor when` and goes back to one with
//! `monitor goto`, `reverse-stepi`s across a function boundary into the caller and
//! `reverse-finish`es, and runs back to the beginning of the replay. The replay, continued to
//! its end, must still match the recording.
//!
//! The answers are checked against the trace of the same recording (`rrr trace`, decoded by
//! Google's `perfetto` classes): the first `do_sys_openat2` there opens `/dev/vdb`, calls
//! `alloc_empty_file` with the credentials gdb shows in the frame it stopped in, then
//! `fd_install` with the descriptor and file gdb showed.

mod gdb_common;

use std::path::Path;
use std::process::Command;

use gdb_common::{
    gdb_session, record_open_write_close, root, test_dir, text, vmlinux, GdbSession, RRR,
};
use serde_json::Value;

/// A position as `monitor when` prints it: EXITS:RIP:HITS[+STEPS].
fn position(line: &str) -> Option<(u64, u64, u64)> {
    let mut parts = line.trim().split(':');
    let exits = parts.next()?.parse().ok()?;
    let rip = u64::from_str_radix(parts.next()?.strip_prefix("0x")?, 16).ok()?;
    let hits = parts.next()?.split('+').next()?.parse().ok()?;
    parts.next().is_none().then_some((exits, rip, hits))
}

/// The value of `name=...` (or `name=name@entry=...`) in a frame line, hex or decimal.
fn frame_arg(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[at..];
    let rest = rest.strip_prefix(&format!("{name}@entry=")).unwrap_or(rest);
    let (digits, radix) = match rest.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (rest, 10),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    u64::from_str_radix(&digits[..end], radix).ok()
}

/// A gdb session against `rrr replay --gdb`: gdb's output, the replay's output (with what it
/// printed before gdb connected), and whether the replay matched its recording.
fn session(rec: &Path, vmlinux: &Path, commands: &[String]) -> (String, String, bool) {
    let GdbSession {
        banner,
        said,
        replay,
        ok,
        ..
    } = gdb_session(rec, vmlinux, &[], commands);
    (said, format!("{banner}{replay}"), ok)
}

/// The trace decoded by Google's classes.
fn decode(trace: &Path) -> Value {
    let out = Command::new("python3")
        .arg(root().join("perfetto/tests/check_trace.py"))
        .arg(trace)
        .output()
        .expect("python3 is needed to decode traces (scripts/setup installs it)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first `do_sys_openat2` of the trace, with the calls inside it, in order.
fn first_open(decoded: &Value) -> Vec<(String, Value)> {
    let mut calls = Vec::new();
    let mut depth = 0usize;
    let mut inside = false;
    for e in decoded["events"].as_array().unwrap() {
        match e["type"].as_str().unwrap_or("") {
            "TYPE_SLICE_BEGIN" => {
                let name = e["name"].as_str().unwrap_or("").to_owned();
                if !inside && name == "do_sys_openat2" {
                    inside = true;
                    depth = 0;
                }
                if inside {
                    depth += 1;
                    calls.push((name, e["args"].clone()));
                }
            }
            "TYPE_SLICE_END" if inside => {
                depth -= 1;
                if depth == 0 {
                    return calls;
                }
            }
            _ => {}
        }
    }
    panic!("no do_sys_openat2 in the trace");
}

fn uint_arg(args: &Value, name: &str) -> Option<u64> {
    let (_, v) = args
        .as_object()?
        .iter()
        .find(|(k, _)| *k == name || k.starts_with(&format!("{name} (")))?;
    v["uint"]
        .as_u64()
        .or(v["ptr"].as_u64())
        .or(v["int"].as_i64().map(|i| i as u64))
}

#[test]
fn gdb_runs_the_replay_backwards_to_a_write_and_across_calls() {
    let dir = test_dir("reverse-tests", "reverse");
    let rec = record_open_write_close(&dir);
    let vmlinux = vmlinux();

    let first: Vec<String> = [
        "break fd_install",
        "continue",
        "monitor when",
        "print nr_files.count",
        "watch nr_files.count",
        "reverse-continue",
        "bt 3",
        "monitor when",
        "print nr_files.count",
        "delete",
        // Far from READY, back over checkpoints: the last open before the stimulus exits.
        "break do_exit",
        "continue",
        "break do_sys_openat2",
        "reverse-continue",
        "monitor when",
        "delete",
    ]
    .map(String::from)
    .to_vec();
    // The position of the breakpoint's stop is only known once gdb printed it: the session is
    // run once to learn it and the commands that use it come after (`monitor goto` of a
    // position from another session of the same recording is the point of naming positions).
    let (said, replay, ok) = session(&rec, &vmlinux, &first);
    let context = format!("gdb said:\n{said}\nrrr replay said:\n{replay}");
    assert!(ok, "{context}");
    let stop = said
        .lines()
        .find(|l| l.starts_with("Breakpoint 1, fd_install ("))
        .unwrap_or_else(|| panic!("no stop at fd_install:\n{context}"));
    let fd = frame_arg(stop, "fd");
    let file = frame_arg(stop, "file").unwrap_or_else(|| panic!("{context}"));
    let positions: Vec<(u64, u64, u64)> = said.lines().filter_map(position).collect();
    assert_eq!(
        positions.len(),
        3,
        "three `monitor when` answers:\n{context}"
    );
    let (at_install, at_write, at_last_open) = (positions[0], positions[1], positions[2]);
    let planted = said
        .lines()
        .find_map(|l| l.strip_prefix("Breakpoint 1 at 0x"))
        .and_then(|l| u64::from_str_radix(l.split(':').next()?, 16).ok())
        .unwrap_or_else(|| panic!("{context}"));
    assert_eq!(
        at_install.1, planted,
        "the position names the breakpoint's RIP: {context}"
    );
    assert!(
        at_install.2 >= 1,
        "a breakpoint's stop is an arrival: {context}"
    );
    // The write came before the stop, in the same or an earlier exit interval.
    assert!(at_write.0 <= at_install.0, "{context}");
    let count = |n: usize| -> i64 {
        said.lines()
            .find_map(|l| l.strip_prefix(&format!("${n} = ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ${n}:\n{context}"))
    };
    let (after, before) = (count(1), count(2));
    // Backwards, gdb stops on the writing instruction, before it ran: the count is one less.
    assert_eq!(before, after - 1, "{context}");
    assert!(
        said.contains(&format!("Old value = {after}\nNew value = {before}")),
        "the watchpoint did not trigger going backwards:\n{context}"
    );
    let frame = said
        .lines()
        .find(|l| l.contains("alloc_empty_file ("))
        .unwrap_or_else(|| panic!("the write is not in alloc_empty_file:\n{context}"));
    let cred = frame_arg(frame, "cred").unwrap_or_else(|| panic!("{context}"));
    assert!(
        said.contains("percpu_counter_add ("),
        "the write is nr_files' increment:\n{context}"
    );
    let last_open = said
        .lines()
        .rfind(|l| l.starts_with("Breakpoint 4, do_sys_openat2 ("))
        .unwrap_or_else(|| panic!("no reverse stop at do_sys_openat2:\n{context}"));
    assert!(
        at_last_open.0 > at_write.0 + 250,
        "the last open is checkpoints away from READY: {context}"
    );
    // Replayed under gdb with travels back, the replay still matches its recording.
    assert!(
        replay.contains("rrr: the replay matches the recording"),
        "{context}"
    );
    assert!(replay.contains("went back to one"), "{context}");

    // A second session goes straight to the named position, then backwards across calls.
    let install = format!("{}:{:#x}:{}", at_install.0, at_install.1, at_install.2);
    let second: Vec<String> = [
        format!("monitor goto {install}"),
        "maint flush register-cache".into(),
        "bt 1".into(),
        "monitor when".into(),
        "reverse-stepi".into(),
        "bt 1".into(),
        "reverse-finish".into(),
        "bt 1".into(),
        "reverse-continue".into(),
        "monitor when".into(),
        "continue".into(),
    ]
    .to_vec();
    let (said, replay, ok) = session(&rec, &vmlinux, &second);
    let context = format!("gdb said:\n{said}\nrrr replay said:\n{replay}");
    assert!(ok, "{context}");
    let frames: Vec<&str> = said.lines().filter(|l| l.starts_with("#0 ")).collect();
    assert_eq!(frames.len(), 3, "{context}");
    assert!(frames[0].contains("fd_install ("), "{context}");
    // The instruction before fd_install's first: the call in its caller.
    assert!(frames[1].contains("in do_sys_openat2 ("), "{context}");
    // Out of do_sys_openat2, backwards: into its caller.
    assert!(frames[2].contains("in do_sys_open ("), "{context}");
    let positions: Vec<(u64, u64, u64)> = said.lines().filter_map(position).collect();
    assert_eq!(positions.len(), 2, "{context}");
    assert_eq!(
        positions[0], at_install,
        "goto goes where `when` said:\n{context}"
    );
    // No breakpoint left: back to the beginning of the replay (an exit boundary, hits 0).
    assert!(
        said.contains("No more reverse-execution history."),
        "{context}"
    );
    assert_eq!(positions[1].2, 0, "{context}");
    assert!(positions[1].0 < at_write.0, "{context}");
    assert!(
        said.contains("[Inferior 1 (process 1) exited normally]"),
        "{context}"
    );
    assert!(
        replay.contains("rrr: the replay matches the recording"),
        "{context}"
    );

    // The trace of the same recording says the same.
    let trace = dir.join("ow.pftrace");
    let out = Command::new(RRR)
        .args(["trace", rec.to_str().unwrap(), "--trace-output"])
        .arg(&trace)
        .args([
            "--function",
            "do_sys_openat2",
            "--function",
            "alloc_empty_file",
            "--function",
            "fd_install",
        ])
        .output()
        .expect("cannot start rrr");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let decoded = decode(&trace);
    let calls = first_open(&decoded);
    let last_name = decoded["events"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["type"] == "TYPE_SLICE_BEGIN" && e["name"] == "do_sys_openat2")
        .and_then(|e| e["args"]["filename"]["str"].as_str())
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned();
    assert!(
        !last_name.is_empty() && last_open.contains(&format!("\"{last_name}\"")),
        "the trace's last open is {last_name:?}, gdb went back to {last_open}"
    );
    let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    let alloc = names
        .iter()
        .position(|n| *n == "alloc_empty_file")
        .unwrap_or_else(|| panic!("{names:?}"));
    let installed = names
        .iter()
        .position(|n| *n == "fd_install")
        .unwrap_or_else(|| panic!("{names:?}"));
    assert!(alloc < installed, "{names:?}");
    assert!(
        calls[0].1["filename"]["str"]
            .as_str()
            .unwrap_or("")
            .contains("/dev/vdb"),
        "{calls:?}"
    );
    assert_eq!(uint_arg(&calls[alloc].1, "cred"), Some(cred), "{calls:?}");
    assert_eq!(
        uint_arg(&calls[installed].1, "file"),
        Some(file),
        "{calls:?}"
    );
    if let Some(fd) = fd {
        assert_eq!(uint_arg(&calls[installed].1, "fd"), Some(fd), "{calls:?}");
    }

    // A moment seen in the trace opens in gdb: `monitor goto` of the position the trace gives
    // fd_install's entry (its `__fentry__` site, after the `endbr64` gdb breaks on) stops there,
    // in the same call.
    let traced_at = calls[installed].1["position"]["str"]
        .as_str()
        .unwrap_or_else(|| panic!("no position in the trace: {calls:?}"))
        .to_owned();
    let (exits, rip, _) = position(&traced_at).unwrap_or_else(|| panic!("{traced_at}"));
    assert_eq!(exits, at_install.0, "the same exit interval as gdb's stop");
    assert!(rip > at_install.1 && rip < at_install.1 + 16, "{traced_at}");
    let third: Vec<String> = [
        format!("monitor goto {traced_at}"),
        "maint flush register-cache".into(),
        "bt 1".into(),
        "monitor when".into(),
        "delete".into(),
        "continue".into(),
    ]
    .to_vec();
    let (said, replay, ok) = session(&rec, &vmlinux, &third);
    let context = format!("gdb said:\n{said}\nrrr replay said:\n{replay}");
    assert!(ok, "{context}");
    let frame = said
        .lines()
        .find(|l| l.starts_with("#0 "))
        .unwrap_or_else(|| panic!("no frame after the goto:\n{context}"));
    assert!(frame.contains("in fd_install ("), "{context}");
    assert_eq!(frame_arg(frame, "file"), Some(file), "{context}");
    let when: Vec<(u64, u64, u64)> = said.lines().filter_map(position).collect();
    assert_eq!(when, [position(&traced_at).unwrap()], "{context}");
    assert!(
        replay.contains("rrr: the replay matches the recording"),
        "{context}"
    );
}

//! `rrr replay --gdb` driven by real GNU gdb in batch mode: a stimulus that opens, writes and
//! closes a file is recorded, its replay waits at READY for gdb, and gdb breaks in the kernel's
//! `do_sys_openat2`, walks the stack back to the system call entry, reads registers and a
//! `task_struct` field by name, single-steps, finishes the function, and lets the replay run to
//! its end, which must still match the recording: the debugger's exits (its breakpoints' `hlt`s,
//! single steps) are not the VM's, and its breakpoints are lifted before the final state hash.
//!
//! Where this host's KVM is software-only the replay runs in the carrier, which has no network:
//! QEMU listens on the host's loopback port and carries gdb's bytes to rrr inside over a
//! virtio-serial port, so gdb runs here on the host as a user would run it.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RRR: &str = env!("CARGO_BIN_EXE_rrr");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("gdb-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The default kernel's vmlinux (cached; `rrr kernel build` prints its directory).
fn vmlinux() -> PathBuf {
    let out = Command::new(RRR)
        .args(["kernel", "build"])
        .output()
        .expect("cannot start rrr");
    assert!(out.status.success(), "{}", text(&out.stderr));
    PathBuf::from(text(&out.stdout).trim()).join("vmlinux")
}

#[test]
fn gdb_breaks_in_the_kernel_steps_and_the_replay_still_matches() {
    let dir = test_dir("session");
    let rec = dir.join("ow.rrr");
    let stimulus = root().join("examples/stimuli/open_write_close.c");
    let out = Command::new(RRR)
        .args(["record", stimulus.to_str().unwrap(), "-o"])
        .arg(&rec)
        .arg("--quiet")
        .output()
        .expect("cannot start rrr");
    assert!(
        out.status.success(),
        "rrr record failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let vmlinux = vmlinux();

    // Refused before any VM starts: the protocol has no authentication.
    let out = Command::new(RRR)
        .args(["replay", rec.to_str().unwrap(), "--gdb", "0.0.0.0:1234"])
        .output()
        .expect("cannot start rrr");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a loopback address"),
        "{}",
        text(&out.stderr)
    );

    let addr = format!("127.0.0.1:{}", free_port());
    let mut replay = Command::new(RRR)
        .args(["replay", rec.to_str().unwrap(), "--quiet", "--gdb", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start rrr replay");
    let mut stdout = replay.stdout.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stdout.read_to_string(&mut all);
        all
    });
    // The replay says when gdb may connect (at READY) and how.
    let mut stderr = BufReader::new(replay.stderr.take().unwrap());
    let mut banner = String::new();
    let started = Instant::now();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("rrr replay --gdb ended before waiting for gdb:\n{banner}");
        }
        banner.push_str(&line);
        if line.contains("target remote") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "{banner}");
    }
    // The kernel's own gdb scripts sit beside vmlinux, and the line loads them.
    let kernel_dir = vmlinux.parent().unwrap();
    assert!(
        banner.contains(&format!(
            "gdb -iex 'add-auto-load-safe-path {}' -iex 'set remotetimeout 60' {} -ex 'target remote {addr}'",
            kernel_dir.display(),
            vmlinux.display()
        )),
        "the banner does not say how to connect:\n{banner}"
    );
    let stderr_reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });

    let commands = [
        format!("target remote {addr}"),
        "break do_sys_openat2".into(),
        "continue".into(),
        "bt".into(),
        "info registers rip".into(),
        "info registers cs cr3".into(),
        // A !SMP kernel: per-CPU variables are plain variables.
        "print ((struct task_struct *)pcpu_hot.current_task)->comm".into(),
        "print ((struct task_struct *)pcpu_hot.current_task)->pid".into(),
        "stepi".into(),
        "info registers rip".into(),
        "finish".into(),
        "lx-ps".into(),
        "lx-dmesg".into(),
        "delete".into(),
        "continue".into(),
    ];
    let mut gdb = Command::new("timeout");
    gdb.args(["600", "gdb", "-batch", "-nx", "-iex"])
        .arg(format!("add-auto-load-safe-path {}", kernel_dir.display()))
        .args(["-iex", "set remotetimeout 60"])
        .arg(&vmlinux);
    for c in &commands {
        gdb.args(["-ex", c]);
    }
    let out = gdb
        .output()
        .expect("cannot start gdb (scripts/setup installs it)");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let status = replay.wait().unwrap();
    let replay_out = stdout_reader.join().unwrap();
    let replay_err = stderr_reader.join().unwrap();
    let context = format!(
        "gdb said:\n{said}\nrrr replay ({status}) said:\n{replay_out}\n{banner}{replay_err}"
    );

    // Stopped at the breakpoint, in the function, with its arguments.
    assert!(
        said.contains("Breakpoint 1, do_sys_openat2 (dfd="),
        "no stop at do_sys_openat2:\n{context}"
    );
    // The backtrace goes through the system call path to its entry.
    for frame in ["do_sys_open (", "do_syscall_64 (", "entry_SYSCALL_64 ("] {
        assert!(
            said.contains(frame),
            "no {frame} in the backtrace:\n{context}"
        );
    }
    // RIP is the breakpoint's address (set back over the `hlt`), in kernel code.
    let rips: Vec<&str> = said.lines().filter(|l| l.starts_with("rip ")).collect();
    assert_eq!(rips.len(), 2, "{context}");
    assert!(rips[0].ends_with("<do_sys_openat2>"), "{context}");
    // One instruction later, still in the function.
    assert!(rips[1].contains("<do_sys_openat2+"), "{context}");
    assert!(
        said.lines()
            .any(|l| l.starts_with("cs ") && l.contains("0x10")),
        "kernel code segment expected:\n{context}"
    );
    assert!(said.lines().any(|l| l.starts_with("cr3 ")), "{context}");
    // The task is the one that opened a file: the agent (init) or the stimulus.
    let comm = said
        .lines()
        .find(|l| l.starts_with("$1 = \""))
        .unwrap_or_else(|| panic!("no comm:\n{context}"));
    assert!(
        comm.starts_with("$1 = \"init\"") || comm.starts_with("$1 = \"stimulus\""),
        "{context}"
    );
    assert!(said.lines().any(|l| l.starts_with("$2 = ")), "{context}");
    // finish ran the function to its return: a file descriptor.
    assert!(said.contains("Value returned is $3 = 3"), "{context}");
    // The kernel's gdb scripts: lx-ps lists the tasks (the agent is init, pid 1), lx-dmesg
    // prints the kernel's log from guest memory.
    assert!(
        said.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("1") && l.ends_with(" init")),
        "no init in lx-ps:\n{context}"
    );
    assert!(
        said.contains("Run /init as init process"),
        "no kernel log from lx-dmesg:\n{context}"
    );
    // The replay ran to its end and told gdb it exited normally: it matched.
    assert!(
        said.contains("[Inferior 1 (process 1) exited normally]"),
        "{context}"
    );
    assert!(status.success(), "{context}");
    assert!(
        replay_out.contains("rrr: the replay matches the recording"),
        "the replay under gdb did not match its recording:\n{context}"
    );
}

//! `rrr replay --gdb` driven by real GNU gdb in batch mode: a stimulus that opens, writes and
//! closes a file is recorded, its replay waits at READY for gdb, and gdb breaks in the kernel's
//! `do_sys_openat2`, walks the stack back to the system call entry, reads registers and a
//! `task_struct` field by name, single-steps, finishes the function, and lets the replay run to
//! its end, which must still match the recording: the debugger's exits (its breakpoints' `hlt`s,
//! single steps) are not the VM's, and its breakpoints are lifted before the final state hash.

mod gdb_common;

use std::process::Command;

use gdb_common::{gdb_session, record_open_write_close, test_dir, text, vmlinux, RRR};

#[test]
fn gdb_breaks_in_the_kernel_steps_and_the_replay_still_matches() {
    let dir = test_dir("gdb-tests", "session");
    let rec = record_open_write_close(&dir);
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

    let commands: Vec<String> = vec![
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
    // The kernel's own gdb scripts sit beside vmlinux; gdb loads them from there.
    let kernel_dir = vmlinux.parent().unwrap();
    let session = gdb_session(
        &rec,
        &vmlinux,
        &[format!("add-auto-load-safe-path {}", kernel_dir.display())],
        &commands,
    );
    let (said, replay_out, banner) = (&session.said, &session.replay, &session.banner);
    let context = session.context();
    // The replay said when gdb may connect (at READY) and how, the scripts' directory included.
    assert!(
        banner.contains(&format!(
            "gdb -iex 'add-auto-load-safe-path {}' -iex 'set remotetimeout 60' {} -ex 'target remote {}'",
            kernel_dir.display(),
            vmlinux.display(),
            session.addr
        )),
        "the banner does not say how to connect:\n{banner}"
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
    assert!(session.ok, "{context}");
    assert!(
        replay_out.contains("rrr: the replay matches the recording"),
        "the replay under gdb did not match its recording:\n{context}"
    );
}

//! `rrr run` end to end: the default kernel, a rootfs per stimulus, a boot (through the carrier
//! where this host's KVM is software-only), the agent's verdict and the crash title.
//!
//! Each test reads the run's `summary.json` rather than scraping the console, and checks the
//! saved console for what the guest itself printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn stimulus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/stimuli")
        .join(name)
}

/// A run directory inside the target dir: the working tree is shared into the carrier, so the
/// VM inside writes its console and summary where this test can read them.
fn run_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("run-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Run {
    summary: Value,
    console: String,
    stdout: String,
    stderr: String,
}

fn rrr_run(name: &str, extra: &[&str]) -> Run {
    let dir = run_dir(name);
    let output = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .arg("run")
        .arg(stimulus(name))
        .arg("--quiet")
        .arg("--run-dir")
        .arg(&dir)
        .args(extra)
        .output()
        .expect("cannot start rrr");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "rrr run {name} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let summary_path = dir.join("summary.json");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap_or_else(|e| {
            panic!(
                "no {} ({e}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
                summary_path.display()
            )
        }))
        .expect("summary.json is JSON");
    let console = std::fs::read_to_string(dir.join("console.log")).expect("console.log saved");
    Run {
        summary,
        console,
        stdout,
        stderr,
    }
}

impl Run {
    fn stimulus_end(&self) -> (&str, &Value) {
        let end = &self.summary["stimulus_end"];
        (end["kind"].as_str().unwrap_or("?"), end)
    }

    fn context(&self) -> String {
        format!(
            "summary: {:#}\nstdout:\n{}\nstderr:\n{}\nconsole tail:\n{}",
            self.summary,
            self.stdout,
            self.stderr,
            self.console
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

#[test]
fn exit_status_three_is_reported() {
    let run = rrr_run("exit3.c", &["--time-limit", "20"]);
    let (kind, end) = run.stimulus_end();
    assert_eq!(kind, "exited", "{}", run.context());
    assert_eq!(end["status"], 3, "{}", run.context());
    assert!(run.summary["crash_title"].is_null(), "{}", run.context());
    assert_eq!(run.summary["vm_end"], "powered off", "{}", run.context());
    assert!(
        run.stdout.contains("stimulus exited with status 3"),
        "{}",
        run.context()
    );
}

#[test]
fn a_file_written_to_the_disk_reads_back() {
    let run = rrr_run("disk_rw.c", &["--time-limit", "60"]);
    let (kind, end) = run.stimulus_end();
    assert_eq!(kind, "exited", "{}", run.context());
    assert_eq!(end["status"], 0, "{}", run.context());
    assert!(
        run.console.contains("read back and verified"),
        "{}",
        run.context()
    );
    assert!(run.summary["crash_title"].is_null(), "{}", run.context());
}

#[test]
fn a_kernel_crash_is_reported_with_its_title() {
    let run = rrr_run("crash_sysrq.c", &["--time-limit", "20"]);
    assert_eq!(
        run.summary["crash_title"],
        "kernel panic: sysrq triggered crash",
        "{}",
        run.context()
    );
    assert_eq!(run.stimulus_end().0, "unfinished", "{}", run.context());
    assert!(
        run.console.contains("sysrq: Trigger a crash"),
        "{}",
        run.context()
    );
    assert!(
        run.stdout
            .contains("kernel crashed: kernel panic: sysrq triggered crash"),
        "{}",
        run.context()
    );
}

#[test]
fn a_missing_stimulus_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["run", "/nonexistent/repro.c"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/repro.c") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn a_stimulus_that_never_exits_ends_at_its_time_limit() {
    // The stimulus spins in user mode with no exits to the VMM; the stall watchdog's landmarks
    // keep the guest's timer ticking, so the agent's limit passes and it kills the stimulus.
    let run = rrr_run("spin_forever.c", &["--time-limit", "3", "--timeout", "200"]);
    let (kind, end) = run.stimulus_end();
    assert_eq!(kind, "timed_out", "{}", run.context());
    assert_eq!(end["limit_secs"], 3, "{}", run.context());
    assert!(
        run.stdout
            .contains("stimulus ran past its time limit of 3 s and was killed"),
        "{}",
        run.context()
    );
    assert!(
        run.console.contains("timed out after 3 s"),
        "{}",
        run.context()
    );
}

//! `rrr run` end to end: the default kernel, a rootfs per stimulus, a boot (through the carrier
//! where this host's KVM is software-only), the agent's verdict and the crash title.
//!
//! Each test reads the run's `summary.json` rather than scraping the console, and checks the
//! saved console for what the guest itself printed.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::RwLock;

use serde_json::{json, Value};

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

/// Runs of this file share the machine, except the determinism runs, which take it whole. In the
/// carrier (nested AMD-V under QEMU's emulator), a busy neighbour occasionally perturbs the guest
/// below our VMM: measured on 2026-11-22, with other carriers running `spin_forever.c` alongside,
/// 4 of 46 runs of `sched_timers.c` diverged with no watchdog kick and no landmark in them; alone
/// (even with every host core busy) and next to another quiet run, 28 of 28 did not.
static MACHINE: RwLock<()> = RwLock::new(());

struct Run {
    dir: PathBuf,
    summary: Value,
    console: String,
    stdout: String,
    stderr: String,
}

fn rrr_run(name: &str, extra: &[&str]) -> Run {
    rrr_run_with(name, &stimulus(name), extra)
}

/// `rrr run` of `stimulus`, with its run directory named after `name`.
fn rrr_run_with(name: &str, stimulus: &Path, extra: &[&str]) -> Run {
    rrr_run_in(&run_dir(name), stimulus, extra)
}

/// `rrr run` of `stimulus` with the run directory `dir`.
fn rrr_run_in(dir: &Path, stimulus: &Path, extra: &[&str]) -> Run {
    let _shared = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    let name = stimulus.display();
    let output = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .arg("run")
        .arg(stimulus)
        .arg("--quiet")
        .arg("--run-dir")
        .arg(dir)
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
    Run::load(dir, stdout, stderr)
}

/// The last line a host-side `rrr` command printed on stdout (a built kernel's or image's path).
fn rrr_prints_path(args: &[&str]) -> PathBuf {
    let output = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(args)
        .output()
        .expect("cannot start rrr");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "rrr {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(stdout.trim().lines().last().unwrap_or_default());
    assert!(
        path.exists(),
        "rrr {args:?} printed no existing path:\n{stdout}"
    );
    path
}

/// Shell-quotes one word for `sh`.
fn quote(word: &OsStr) -> String {
    let word = String::from_utf8(word.as_bytes().to_vec()).expect("test paths are UTF-8");
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Runs the stimulus `name` once per entry of `dirs`, one run after the other, in one VM host:
/// one carrier for all of them where this host's KVM is software-only (a carrier takes seconds
/// to start), this host itself where it has VT-x/AMD-V. The kernel and rootfs are built first,
/// on the host, so nothing is compiled under emulation.
fn rrr_runs_in_one_carrier(name: &str, dirs: &[&str], extra: &[&str]) -> Vec<Run> {
    let steps: Vec<Step> = dirs.iter().map(|d| Step::Run(d, &[])).collect();
    rrr_steps_in_one_carrier(name, extra, &steps)
}

/// One step of [`rrr_steps_in_one_carrier`].
enum Step<'a> {
    /// `rrr run` of the stimulus into the named run directory, with these extra arguments.
    Run(&'a str, &'a [&'a str]),
    /// A shell line, with `$RRR`, `$KERNEL` and `$ROOTFS` set.
    Shell(String),
}

/// [`rrr_runs_in_one_carrier`] with shell lines between the runs; `common` goes to every run.
fn rrr_steps_in_one_carrier(name: &str, common: &[&str], steps: &[Step]) -> Vec<Run> {
    let _alone = MACHINE.write().unwrap_or_else(|e| e.into_inner());
    let kernel = rrr_prints_path(&["kernel", "build"]);
    let image = rrr_prints_path(&["rootfs", "build"]);
    let binary = rrr_prints_path(&["rootfs", "stimulus", stimulus(name).to_str().unwrap()]);
    let stimulus = stimulus(name);
    let group = run_dir(&format!("{name}-group"));
    let mut script = format!(
        "set -e\nRRR={}\nKERNEL={}\nROOTFS={}\n",
        quote(OsStr::new(env!("CARGO_BIN_EXE_rrr"))),
        quote(kernel.as_os_str()),
        quote(image.as_os_str())
    );
    let mut dirs = Vec::new();
    for step in steps {
        let (dir, extra) = match step {
            Step::Shell(line) => {
                script += line;
                script += "\n";
                continue;
            }
            Step::Run(dir, extra) => (group.join(dir), extra),
        };
        std::fs::create_dir_all(&dir).unwrap();
        let mut words: Vec<&OsStr> = vec![
            env!("CARGO_BIN_EXE_rrr").as_ref(),
            "run".as_ref(),
            stimulus.as_os_str(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--rootfs".as_ref(),
            image.as_os_str(),
            "--stimulus-binary".as_ref(),
            binary.as_os_str(),
            "--run-dir".as_ref(),
            dir.as_os_str(),
            "--quiet".as_ref(),
        ];
        words.extend(common.iter().map(OsStr::new));
        words.extend(extra.iter().map(OsStr::new));
        script += &shell_line(&words, &dir);
        dirs.push(dir);
    }
    let output = script_in_one_carrier(&group, &script);
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        output.status.success(),
        "the runs of {name} failed ({}):\nscript:\n{script}\nstderr:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        dirs.iter()
            .map(|d| format!(
                "{}:\n{}{}",
                d.display(),
                read(d.join("stdout")),
                read(d.join("stderr"))
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    dirs.iter()
        .map(|d| Run::load(d, read(d.join("stdout")), read(d.join("stderr"))))
        .collect()
}

/// Runs the shell script `script` (saved in `group`) in one carrier where this host's KVM is
/// software-only, or directly on a VT-x/AMD-V host.
fn script_in_one_carrier(group: &Path, script: &str) -> std::process::Output {
    let script_path = group.join("script.sh");
    std::fs::write(&script_path, script).unwrap();
    let mut cmd = if rrr_vmm::host::KvmKind::detect().is_hardware() {
        Command::new("sh")
    } else {
        let mut carrier = Command::new(env!("CARGO_BIN_EXE_rrr"));
        carrier
            .args(["carrier", "run", "--share"])
            .arg(group)
            .args(["--", "sh"]);
        carrier
    };
    cmd.arg(&script_path).output().expect("cannot start rrr")
}

/// One `rrr` command line as a shell line, its stdout and stderr kept in `dir`.
fn shell_line(words: &[&OsStr], dir: &Path) -> String {
    let words: Vec<String> = words.iter().map(|w| quote(w)).collect();
    format!(
        "{} >{} 2>{}\n",
        words.join(" "),
        quote(dir.join("stdout").as_os_str()),
        quote(dir.join("stderr").as_os_str())
    )
}

impl Run {
    fn load(dir: &Path, stdout: String, stderr: String) -> Run {
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
            dir: dir.to_owned(),
            summary,
            console,
            stdout,
            stderr,
        }
    }

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
fn exit_status_three_is_reported_for_a_stimulus_and_run_directory_in_tmp() {
    // Users download reproducers to /tmp, which the carrier mounts its own tmpfs over: both
    // the stimulus and the run directory live there, as the user would have them.
    let tmp = tempfile::Builder::new()
        .prefix("rrr-run-test")
        .tempdir_in("/tmp")
        .unwrap();
    let stimulus_dir = tmp.path().join("x");
    std::fs::create_dir(&stimulus_dir).unwrap();
    let in_tmp = stimulus_dir.join("exit3.c");
    std::fs::copy(stimulus("exit3.c"), &in_tmp).unwrap();
    let run = rrr_run_in(
        &tmp.path().join("run"),
        &in_tmp,
        &[
            "--time-limit",
            "20",
            "--append",
            "panic_on_warn=1 rrr.marker=7",
        ],
    );
    let command_line = run
        .console
        .lines()
        .find(|l| l.contains("Command line:"))
        .unwrap_or_default();
    assert!(
        command_line.ends_with(" panic_on_warn=1 rrr.marker=7"),
        "--append did not reach the kernel's command line: {command_line:?}"
    );
    let (kind, end) = run.stimulus_end();
    assert_eq!(kind, "exited", "{}", run.context());
    assert_eq!(end["status"], 3, "{}", run.context());
    assert!(run.summary["crash_title"].is_null(), "{}", run.context());
    assert_eq!(run.summary["boot_reports"], json!([]), "{}", run.context());
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
    // The panic came after READY: the stimulus's, not the boot's.
    assert_eq!(run.summary["boot_reports"], json!([]), "{}", run.context());
    assert!(
        std::fs::read_to_string(run.dir.join("crash.txt"))
            .is_ok_and(|text| text.contains("sysrq_handle_crash")),
        "{}",
        run.context()
    );
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
fn a_kernel_report_during_boot_is_not_the_stimulus_crash() {
    // A blank disk: the kernel boots, finds no filesystem on it and panics before the agent (and
    // so the stimulus) could ever run. A real boot-time report, through the normal `rrr run`.
    let disk_dir = run_dir("blank-disk");
    let blank = disk_dir.join("blank.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&blank)
        .arg("16M")
        .status()
        .expect("qemu-img is needed (rrr builds its images with it)");
    assert!(status.success(), "qemu-img create failed");
    let run = rrr_run_with(
        "blank-disk-run",
        &stimulus("exit3.c"),
        &["--rootfs", blank.to_str().unwrap(), "--time-limit", "20"],
    );
    assert!(run.summary["crash_title"].is_null(), "{}", run.context());
    assert_eq!(run.stimulus_end().0, "never_started", "{}", run.context());
    let boot_reports = run.summary["boot_reports"].as_array().unwrap();
    assert_eq!(boot_reports.len(), 1, "{}", run.context());
    assert!(
        boot_reports[0]
            .as_str()
            .unwrap()
            .starts_with("kernel panic: VFS: Unable to mount root fs"),
        "{}",
        run.context()
    );
    let saved = std::fs::read_to_string(run.dir.join("boot-reports.txt")).unwrap_or_default();
    assert!(saved.contains("Unable to mount root fs"), "{saved}");
    assert!(!run.dir.join("crash.txt").exists(), "{}", run.context());
    assert!(
        run.stdout
            .contains("the kernel already reported during boot, before the stimulus started: kernel panic: VFS"),
        "{}",
        run.context()
    );
}

#[test]
fn the_same_stimulus_twice_is_the_same_run() {
    // Interrupts are injected only at synchronous exits and virtual time counts exits, so two
    // runs make the same exits and print the same console, timestamps included. The stimulus
    // sleeps in a thread, bounces a byte between two processes and fsyncs a file: timers, the
    // scheduler and the disk.
    let runs = rrr_runs_in_one_carrier(
        "sched_timers.c",
        &["first", "second"],
        &["--time-limit", "30"],
    );
    let [first, second] = &runs[..] else {
        unreachable!()
    };
    for run in &runs {
        let (kind, end) = run.stimulus_end();
        assert_eq!(kind, "exited", "{}", run.context());
        assert_eq!(end["status"], 0, "{}", run.context());
        assert!(run.summary["crash_title"].is_null(), "{}", run.context());
    }
    // The workload must interleave: a timer wakes the sleeper while the ping-pong still runs,
    // else this test covers less than it says.
    let lines: Vec<&str> = first.console.lines().collect();
    let first_wake = lines.iter().position(|l| l.contains("sleeper woke"));
    let last_pong = lines.iter().rposition(|l| l.contains("sched_timers: pong"));
    assert!(
        matches!((first_wake, last_pong), (Some(w), Some(p)) if w < p),
        "the sleeper never woke during the ping-pong:\n{}",
        first.context()
    );

    assert_same_run_without_landmarks(first, second);
}

#[test]
fn torture_stimuli_run_the_same_twice() {
    // Clocks and randomness, four threads racing, POSIX timers with alarm and nanosleep, signals
    // between threads, a ring of processes over pipes: each of them twice, the same run.
    for (name, expect) in [
        ("torture/clocks.c", "addresses stack"),
        ("torture/race.c", "race: counter"),
        ("torture/timers.c", "alarm 1"),
        ("torture/signals.c", "signals: 100 100 100 received"),
        ("torture/fork_pipes.c", "fork_pipes: done"),
    ] {
        let runs = rrr_runs_in_one_carrier(name, &["first", "second"], &["--time-limit", "30"]);
        for run in &runs {
            let (kind, end) = run.stimulus_end();
            assert_eq!(kind, "exited", "{}", run.context());
            assert_eq!(end["status"], 0, "{}", run.context());
            assert!(run.console.contains(expect), "{}", run.context());
        }
        assert_same_run_without_landmarks(&runs[0], &runs[1]);
    }
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
    // The stimulus spins in user mode with no system call for long stretches; its progress
    // exits (the trace-pc runtime) keep the guest's timer ticking, so the agent's limit passes
    // and it kills the stimulus.
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

#[test]
fn a_fault_after_the_stimulus_started_says_it_started() {
    // The stimulus masks the timer at the PIC and sleeps: the guest idles with nothing left to
    // wake it, and the VMM ends the run with a fault. The agent had said the stimulus started,
    // so the verdict must be "unfinished", not "never started".
    let run = rrr_run("mask_timer.c", &["--time-limit", "20"]);
    assert!(
        run.console.contains("mask_timer: masking the PIC"),
        "{}",
        run.context()
    );
    let vm_end = run.summary["vm_end"].as_str().unwrap_or_default();
    assert!(vm_end.starts_with("fault: "), "{}", run.context());
    assert_eq!(run.stimulus_end().0, "unfinished", "{}", run.context());
}

#[test]
fn a_closed_stdout_neither_hangs_the_run_nor_cuts_its_record() {
    // `rrr run lines.c | head -n 1`: the reader of stdout leaves after one line. The run must
    // still end, with the whole console in console.log and a summary.
    let _shared = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    let dir = run_dir("closed-stdout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .arg("run")
        .arg(stimulus("lines.c"))
        .arg("--run-dir")
        .arg(&dir)
        .args(["--time-limit", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so a hung run can be killed with its carrier.
        .process_group(0)
        .spawn()
        .expect("cannot start rrr");
    let stdout = child.stdout.take().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first).unwrap();
    // The reader is dropped here: stdout is now a pipe without a reader.
    assert!(!first.is_empty(), "rrr printed nothing on stdout");
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(400);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: signalling the process group we created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "rrr run with a closed stdout hung; stderr:\n{}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "rrr run failed ({status}):\n{stderr}");
    let run = Run::load(&dir, String::new(), stderr);
    let (kind, end) = run.stimulus_end();
    assert_eq!(
        (kind, &end["status"]),
        ("exited", &json!(0)),
        "{}",
        run.context()
    );
    let lines = run
        .console
        .lines()
        .filter(|l| l.contains("lines: line "))
        .count();
    assert_eq!(lines, 300, "console.log is cut short:\n{}", run.context());
}

#[test]
fn a_restored_snapshot_runs_exactly_as_a_boot() {
    // One snapshot per machine, taken at the agent's READY; the stimulus comes after, on its
    // own disk. A run restored from the snapshot must be the very run that booted straight
    // through: the same console bytes (the boot log the snapshot kept, then everything after
    // GO) and the same exit count. sched_timers.c uses timers, the scheduler, the disk and the
    // console. A private kernel parameter gives this test a snapshot of its own.
    let marker = format!("rrr.snapshot_test={}", std::process::id());
    let damage = "printf 'X' | dd of=\"$SNAP\" bs=1 seek=600 conv=notrunc 2>/dev/null";
    let runs = rrr_steps_in_one_carrier(
        "sched_timers.c",
        &["--time-limit", "30", "--append", &marker],
        &[
            Step::Run("booted", &["--boot"]),
            Step::Shell(format!(
                "SNAP=$(\"$RRR\" snapshot --kernel \"$KERNEL\" --rootfs \"$ROOTFS\" --append {marker} 2>/dev/null)"
            )),
            Step::Run("restored-1", &[]),
            Step::Run("restored-2", &[]),
            Step::Shell(damage.to_string()),
            Step::Run("after-damage", &[]),
            Step::Run("restored-3", &[]),
        ],
    );
    let [booted, restored_1, restored_2, after_damage, restored_3] = &runs[..] else {
        unreachable!()
    };
    let start = |run: &Run| {
        run.summary["start"]["kind"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    assert_eq!(start(booted), "booted", "{}", booted.context());
    for run in [restored_1, restored_2, restored_3] {
        assert_eq!(start(run), "restored", "{}", run.context());
        let ms = run.summary["start"]["start_ms"]
            .as_f64()
            .unwrap_or(f64::MAX);
        eprintln!("restore took {ms:.1} ms");
    }
    // A damaged snapshot is named as such and replaced by a new boot; the run goes on.
    assert_eq!(
        start(after_damage),
        "booted_and_saved",
        "{}",
        after_damage.context()
    );
    assert!(
        after_damage.stderr.contains("checksum does not match"),
        "{}",
        after_damage.context()
    );
    let exits = |run: &Run| run.summary["exits"].as_u64().unwrap_or_default();
    for run in &runs {
        let (kind, end) = run.stimulus_end();
        assert_eq!(kind, "exited", "{}", run.context());
        assert_eq!(end["status"], 0, "{}", run.context());
        assert_eq!(
            (exits(run), &run.summary["virtual_time_ns"]),
            (exits(booted), &booted.summary["virtual_time_ns"]),
            "{} made a different number of exits than the boot",
            run.dir.display()
        );
        let differing = run
            .console
            .lines()
            .zip(booted.console.lines())
            .position(|(x, y)| x != y);
        assert!(
            run.console == booted.console,
            "{} printed another console than the boot (first differing line {differing:?}):\n{}",
            run.dir.display(),
            run.context()
        );
    }
    assert!(
        booted.console.contains("sleeper woke") && booted.console.contains("fsync"),
        "{}",
        booted.context()
    );
}

/// Exits, virtual time and landmarks of a run, for comparing runs.
fn timeline(run: &Run) -> (u64, u64, u64) {
    let number = |key: &str| run.summary[key].as_u64().unwrap_or(u64::MAX);
    (
        number("exits"),
        number("virtual_time_ns"),
        number("landmarks"),
    )
}

/// Asserts that two runs made the same exits and printed the same console, with no landmark.
fn assert_same_run_without_landmarks(first: &Run, second: &Run) {
    eprintln!(
        "{}: exits {} and {}, progress exits {} and {} ({} and {}), host seconds {} and {}",
        first.summary["stimulus"],
        first.summary["exits"],
        second.summary["exits"],
        first.summary["progress_exits"],
        second.summary["progress_exits"],
        first.summary["progress"],
        second.summary["progress"],
        first.summary["host_secs"],
        second.summary["host_secs"]
    );
    for run in [first, second] {
        assert_eq!(
            run.summary["landmarks"],
            0,
            "a host-timed landmark happened:\n{}",
            run.context()
        );
        assert_eq!(
            run.summary["landmarks_by_kind"],
            json!({"spin_wait": 0, "changing_state": 0}),
            "{}",
            run.context()
        );
        assert!(
            run.summary["progress"]["kernel"].as_u64() > Some(0),
            "the kernel made no progress exit (is its KCOV hook in?):\n{}",
            run.context()
        );
    }
    assert_eq!(
        timeline(first),
        timeline(second),
        "two runs made different exits:\n{}\n---\n{}",
        first.context(),
        second.context()
    );
    assert_eq!(
        first.console,
        second.console,
        "two runs printed different consoles:\n{}\n---\n{}",
        first.context(),
        second.context()
    );
}

#[test]
fn cpu_bound_threads_are_preempted_at_the_same_points() {
    // Two threads compute for about two seconds of guest time with no system call: only the
    // progress counter (their trace-pc runtime) makes exits, so only it lets the timer preempt
    // them. Without it they would run on stall-watchdog landmarks, which are host-timed.
    let runs = rrr_runs_in_one_carrier(
        "cpu_threads.c",
        &["first", "second"],
        &["--time-limit", "60"],
    );
    let [first, second] = &runs[..] else {
        unreachable!()
    };
    for run in &runs {
        let (kind, end) = run.stimulus_end();
        assert_eq!(kind, "exited", "{}", run.context());
        assert_eq!(end["status"], 0, "{}", run.context());
        assert!(
            run.summary["progress"]["user"].as_u64() > Some(1000),
            "the stimulus made (almost) no progress exits:\n{}",
            run.context()
        );
    }
    // The threads must really have been switched between while they computed.
    let switches = first
        .console
        .lines()
        .find_map(|l| l.strip_prefix("cpu_threads: "))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        switches >= 10,
        "the threads were hardly preempted:\n{}",
        first.context()
    );
    assert_same_run_without_landmarks(first, second);
}

#[test]
fn getrandom_is_ready_at_once_and_follows_the_seed() {
    // The boot seed (SETUP_RNG_SEED) makes the kernel's crng ready before init: getrandom()
    // does not wait in the jitter-entropy loop (a timer spin that needed landmarks), and prints
    // the same bytes and addresses on every run with one seed, other ones with another seed.
    let runs = rrr_steps_in_one_carrier(
        "getrandom.c",
        &["--time-limit", "30"],
        &[
            Step::Run("first", &[]),
            Step::Run("second", &[]),
            Step::Run("other-seed", &["--seed", "1"]),
        ],
    );
    let [first, second, other] = &runs[..] else {
        unreachable!()
    };
    let printed = |run: &Run| -> Vec<String> {
        run.console
            .lines()
            .filter(|l| l.starts_with("getrandom: "))
            .map(str::to_owned)
            .collect()
    };
    for run in &runs {
        assert_eq!(run.stimulus_end().0, "exited", "{}", run.context());
        let lines = printed(run);
        assert!(
            lines.len() == 2 && lines[0].starts_with("getrandom: crng ready: "),
            "{}",
            run.context()
        );
    }
    assert_same_run_without_landmarks(first, second);
    assert_eq!(first.summary["seed"], 0);
    assert_eq!(other.summary["seed"], 1);
    let (mine, theirs) = (printed(first), printed(other));
    assert_ne!(
        mine[0], theirs[0],
        "another seed gave the same random bytes"
    );
    assert_ne!(mine[1], theirs[1], "another seed gave the same addresses");
}

#[test]
fn tsc_and_random_instructions_read_virtual_values_and_follow_the_seed() {
    // rdtsc/rdtscp trap into the runtime, which reads the VMM's virtual TSC; rdrand/rdseed were
    // rewritten into traps answered from the VMM's seeded PRNG. So two runs print the same
    // values, another seed other random numbers, and the TSC is virtual time at 500 MHz.
    let runs = rrr_steps_in_one_carrier(
        "torture/tsc_rand.c",
        &["--time-limit", "60"],
        &[
            Step::Run("first", &[]),
            Step::Run("second", &[]),
            Step::Run("other-seed", &["--seed", "1"]),
        ],
    );
    let [first, second, other] = &runs[..] else {
        unreachable!()
    };
    for run in &runs {
        let (kind, end) = run.stimulus_end();
        assert_eq!(kind, "exited", "{}", run.context());
        // The stimulus checks flags, register widths and monotonic readings itself.
        assert_eq!(end["status"], 0, "{}", run.context());
        assert!(run.console.contains("tsc_rand: done"), "{}", run.context());
    }
    assert_same_run_without_landmarks(first, second);

    let numbers = |run: &Run, prefix: &str| -> Vec<u64> {
        let line = run
            .console
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", run.context()));
        line.split(|c: char| !c.is_ascii_digit())
            .filter_map(|word| word.parse().ok())
            .collect()
    };
    let tsc = numbers(first, "tsc_rand: rdtsc ");
    let [rdtsc, rdtscp, aux] = tsc[..] else {
        panic!("{tsc:?}")
    };
    assert_eq!(aux, 0, "rdtscp's TSC_AUX is CPU 0");
    assert!(
        rdtscp > rdtsc && rdtscp - rdtsc < 500_000,
        "rdtscp {rdtscp} is not a little after rdtsc {rdtsc}"
    );
    // 500 MHz of virtual time since the VM was created: a little more than the guest's boot
    // time (the kernel starts its clock after the VM), and less than the whole run.
    let boot_ns = numbers(first, "tsc_rand: boot time ")[0];
    let tsc_ns = rdtsc * 2;
    let run_ns = first.summary["virtual_time_ns"].as_u64().unwrap();
    assert!(
        tsc_ns > boot_ns && tsc_ns - boot_ns < 1_000_000_000 && tsc_ns < run_ns,
        "rdtsc {rdtsc} is not 500 MHz of virtual time (boot time {boot_ns} ns, run {run_ns} ns)"
    );
    // A 10 ms sleep on a 250 Hz jiffies clock is 2 to 4 ticks of it: 6 to 20 ms of TSC.
    let slept = numbers(first, "tsc_rand: 10 ms asleep: ")[0];
    assert!(
        (3_000_000..10_000_000).contains(&slept),
        "10 ms asleep took {slept} TSC ticks:\n{}",
        first.context()
    );

    let random = |run: &Run| -> Vec<String> {
        run.console
            .lines()
            .filter(|l| l.starts_with("tsc_rand: rdrand") || l.starts_with("tsc_rand: rdseed"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(random(first).len(), 12, "{}", first.context());
    assert_eq!(other.summary["seed"], 1);
    let theirs = random(other);
    for line in random(first) {
        assert!(
            !theirs.contains(&line),
            "another seed gave the same {line:?}"
        );
    }
}

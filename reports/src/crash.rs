//! Kernel crash reports on the guest console, titled the way syzbot titles them.
//!
//! The console is fed to a [`CrashDetector`] as it streams. A line that starts a kernel report (an
//! oops, a warning, a sanitizer report, a hung task, a panic) opens a report; the following lines
//! are kept until the report ends, another report starts, or it grows past a bound. The title
//! follows syzkaller's conventions (`WARNING in signal_wake_up_state`, `KASAN: use-after-free Read
//! in foo`): the kind of report, then the function the report blames, taken from the report line,
//! the `RIP:` line or the first frame of the call trace that is not reporting machinery.
//!
//! The run's verdict is about the stimulus, so the detector is told where in the stream the
//! stimulus started ([`CrashDetector::stimulus_started`]). Reports printed before that point are
//! boot-time reports: the kernel was already unwell before the stimulus ran, and a developer
//! wants to know, but they are not what the stimulus caused. Like syzbot, the verdict is the
//! first report after that point.

use std::sync::OnceLock;

use regex::Regex;

/// How many lines of a report are kept; a report's title never needs more.
const MAX_REPORT_LINES: usize = 400;
/// How long a console line may grow before it is cut (the guest controls the console).
const MAX_LINE_BYTES: usize = 4096;
/// How many boot-time reports are kept; a warning storm during boot must not grow without bound.
const MAX_BOOT_REPORTS: usize = 16;

/// A kernel report found on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// syzbot-style title, e.g. `WARNING in signal_wake_up_state`.
    pub title: String,
    /// The report's lines, without console timestamps.
    pub text: String,
}

/// Which side of the stimulus's start a console line was printed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Boot,
    Stimulus,
}

/// The lines of one report, and when it started.
#[derive(Debug, Clone)]
struct Collected {
    phase: Phase,
    lines: Vec<String>,
}

impl Collected {
    fn to_report(&self) -> CrashReport {
        let lines: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        // Every line that opens a report has a title rule; should one ever be missed, the first
        // line is still a better title than claiming there was no report.
        let title = title_of(&lines).unwrap_or_else(|| lines[0].trim().to_owned());
        CrashReport {
            title,
            text: lines.join("\n"),
        }
    }
}

/// Watches a console byte stream for kernel reports: the boot-time ones, and the first one after
/// the stimulus started.
#[derive(Debug, Clone)]
pub struct CrashDetector {
    partial: Vec<u8>,
    /// The phase of the line in `partial`: the phase its first byte arrived in.
    partial_phase: Option<Phase>,
    phase: Phase,
    /// The report still collecting lines.
    open: Option<Collected>,
    boot_reports: Vec<Collected>,
    /// The stimulus's report, once it has ended; nothing after it is looked at.
    stimulus_report: Option<Collected>,
}

impl Default for CrashDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl CrashDetector {
    pub fn new() -> Self {
        CrashDetector {
            partial: Vec::new(),
            partial_phase: None,
            phase: Phase::Boot,
            open: None,
            boot_reports: Vec::new(),
            stimulus_report: None,
        }
    }

    /// Marks the point in the stream where the stimulus started: every line that begins after
    /// this call is the stimulus's. A line already half printed keeps the phase it began in, so
    /// a boot report is never cut in two by the mark.
    pub fn stimulus_started(&mut self) {
        self.phase = Phase::Stimulus;
    }

    /// Whether [`Self::stimulus_started`] has been called.
    pub fn in_stimulus(&self) -> bool {
        self.phase == Phase::Stimulus
    }

    /// Feeds console output; any chunking of the stream gives the same result.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            let phase = *self.partial_phase.get_or_insert(self.phase);
            match byte {
                b'\n' => {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    self.partial_phase = None;
                    self.take_line(&line, phase);
                }
                b'\r' => {}
                _ if self.partial.len() < MAX_LINE_BYTES => self.partial.push(byte),
                _ => {}
            }
        }
    }

    fn take_line(&mut self, raw: &str, phase: Phase) {
        if self.stimulus_report.is_some() {
            return;
        }
        let line = strip_console_prefix(raw);
        let starts = starts_report(line);
        if let Some(open) = &mut self.open {
            // A report ends where the next one starts, except for the lines the kernel prints
            // inside one report (the oops banner after `BUG:`, the panic after an oops). The
            // stimulus's start ends a boot report too: what follows is the stimulus's.
            let same_report = open.phase == phase && (!starts || continues_report(line));
            if same_report {
                open.lines.push(line.to_owned());
                if ends_report(line) || open.lines.len() >= MAX_REPORT_LINES {
                    self.close();
                }
                return;
            }
            self.close();
            if self.stimulus_report.is_some() {
                return;
            }
        }
        let room = phase == Phase::Stimulus || self.boot_reports.len() < MAX_BOOT_REPORTS;
        if starts && room {
            self.open = Some(Collected {
                phase,
                lines: vec![line.to_owned()],
            });
        }
    }

    fn close(&mut self) {
        if let Some(report) = self.open.take() {
            match report.phase {
                Phase::Boot => self.boot_reports.push(report),
                Phase::Stimulus => self.stimulus_report = Some(report),
            }
        }
    }

    /// The detector as it would stand if the line still streaming ended now, so a guest that
    /// dies mid-line or mid-report still has its report titled.
    fn settled(&self) -> CrashDetector {
        let mut settled = self.clone();
        if settled.partial_phase.is_some() {
            settled.feed(b"\n");
        }
        settled.close();
        settled
    }

    /// The first report printed after the stimulus started: the run's verdict. A report still
    /// streaming gets the best title its lines allow.
    pub fn report(&self) -> Option<CrashReport> {
        self.settled()
            .stimulus_report
            .as_ref()
            .map(Collected::to_report)
    }

    /// The reports printed before the stimulus started (all of them if it never did), oldest
    /// first, at most [`MAX_BOOT_REPORTS`].
    pub fn boot_reports(&self) -> Vec<CrashReport> {
        self.settled()
            .boot_reports
            .iter()
            .map(Collected::to_report)
            .collect()
    }
}

fn regex(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("crash patterns are valid regexes"))
}

/// Removes `[   12.345678]` timestamps and `[  T123]` caller ids that printk may prepend.
fn strip_console_prefix(line: &str) -> &str {
    static PREFIX: OnceLock<Regex> = OnceLock::new();
    let prefix = regex(&PREFIX, r"^\s*(\[\s*\d+\.\d+\]\s*)?(\[\s*[TC]\d+\]\s*)?");
    let end = prefix.find(line).map_or(0, |m| m.end());
    &line[end..]
}

fn starts_report(line: &str) -> bool {
    static START: OnceLock<Regex> = OnceLock::new();
    regex(
        &START,
        r"^(BUG: |WARNING: |KASAN: |KCSAN: |KMSAN: |UBSAN: |general protection fault|kernel BUG at |divide error: |Kernel panic - not syncing|INFO: task .* blocked for more than|INFO: rcu .*(detected|self-detected) stall|invalid opcode: |Oops: )",
    )
    .is_match(line)
}

/// Report-starting lines the kernel prints in the middle of a report it is already printing: the
/// die banner after `BUG: kernel NULL pointer dereference` or `kernel BUG at`, and the panic that
/// follows an oops or a warning under `panic_on_warn`.
fn continues_report(line: &str) -> bool {
    line.starts_with("Oops: ")
        || line.starts_with("invalid opcode: ")
        || line.starts_with("Kernel panic - not syncing")
}

fn ends_report(line: &str) -> bool {
    line.starts_with("---[ end trace")
        || line.starts_with("---[ end Kernel panic")
        || line.starts_with("Kernel Offset:")
        || line.starts_with("Rebooting in")
}

/// Frames that belong to the reporting machinery, never to the code at fault.
fn is_reporting_frame(function: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "dump_stack",
        "show_stack",
        "__dump_stack",
        "__warn",
        "warn_slowpath",
        "report_bug",
        "handle_bug",
        "exc_invalid_op",
        "asm_exc_",
        "exc_",
        "panic",
        "kasan_",
        "__kasan_",
        "__asan_",
        "check_memory_region",
        "print_report",
        "print_address_description",
        "ubsan_",
        "__ubsan_",
        "kmsan_",
        "__msan_",
        "kcsan_",
        "__kcsan_",
        "__tsan_",
        "lockdep_",
        "__might_sleep",
        "__might_resched",
        "__might_fault",
        "might_sleep",
        "__schedule_bug",
        "schedule_debug",
        "do_error_trap",
        "do_trap",
        "die",
        "oops_",
        "nmi_",
        "watchdog",
        "rcu_dump",
        "print_cpu_stall",
        "check_cpu_stall",
        "sched_show_task",
        "show_regs",
        "debug_show",
        "hung_task",
        "check_hung",
        "printk",
        "vprintk",
        "_printk",
        // Blocking primitives: a hung task is blamed on what it was waiting in, as syzbot does.
        "__schedule",
        "schedule",
        "io_schedule",
        "context_switch",
        "__switch_to",
        "rwsem_down",
        "__rwsem",
        "down_read",
        "down_write",
        "__mutex_lock",
        "mutex_lock",
        "wait_for_completion",
        "__wait_for_common",
        "__wait_on",
        "do_wait_for_common",
    ];
    PREFIXES.iter().any(|p| function.starts_with(p))
}

/// The function named by `RIP: 0010:func+0x12/0x40`.
fn rip_function(lines: &[&str]) -> Option<String> {
    static RIP: OnceLock<Regex> = OnceLock::new();
    let rip = regex(&RIP, r"^RIP: [0-9a-f]{4}:([A-Za-z0-9_.$]+)\+0x");
    lines
        .iter()
        .find_map(|line| rip.captures(line).map(|c| c[1].to_owned()))
        .filter(|f| !is_reporting_frame(f))
}

/// The first call-trace frame that is not reporting machinery or an unreliable (`?`) frame.
fn stack_function(lines: &[&str]) -> Option<String> {
    static FRAME: OnceLock<Regex> = OnceLock::new();
    let frame = regex(&FRAME, r"^\s*([A-Za-z0-9_.$]+)\+0x[0-9a-f]+/0x[0-9a-f]+");
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("Call Trace:"))?;
    lines[start + 1..]
        .iter()
        .filter(|l| !l.trim_start().starts_with('?'))
        .filter_map(|l| frame.captures(l).map(|c| c[1].to_owned()))
        .find(|f| !is_reporting_frame(f))
}

/// `func+0x12/0x40` or `func.cold+0x3` → `func`.
fn bare_function(symbol: &str) -> String {
    let name = symbol.split('+').next().unwrap_or(symbol);
    name.split(".cold").next().unwrap_or(name).to_owned()
}

/// The best available name for the code at fault: RIP when the report has one, else the stack.
fn blamed_function(lines: &[&str]) -> Option<String> {
    rip_function(lines).or_else(|| stack_function(lines))
}

fn with_function(kind: &str, function: Option<String>) -> String {
    match function {
        Some(f) => format!("{kind} in {}", bare_function(&f)),
        None => kind.to_owned(),
    }
}

/// The syzbot-style title of a report whose first line is `lines[0]`.
pub fn title_of(lines: &[&str]) -> Option<String> {
    static KASAN: OnceLock<Regex> = OnceLock::new();
    static KMSAN: OnceLock<Regex> = OnceLock::new();
    static KCSAN: OnceLock<Regex> = OnceLock::new();
    static UBSAN: OnceLock<Regex> = OnceLock::new();
    static WARNING: OnceLock<Regex> = OnceLock::new();
    static ACCESS: OnceLock<Regex> = OnceLock::new();
    static PANIC: OnceLock<Regex> = OnceLock::new();
    let first = *lines.first()?;
    // Since 6.x, die() prefixes its banner with "Oops: " ("Oops: general protection fault, ...",
    // "Oops: invalid opcode: ..."); syzbot titles by what follows.
    let first = match first.strip_prefix("Oops: ") {
        Some(rest) if starts_report(rest) && !rest.starts_with("Oops: ") => rest,
        _ => first,
    };

    if let Some(c) = regex(&KASAN, r"^(?:BUG: )?KASAN: ([a-z0-9-]+) in ([^\s]+)").captures(first) {
        let access = lines.iter().skip(1).find_map(|l| {
            regex(&ACCESS, r"^(Read|Write) of size")
                .captures(l)
                .map(|a| a[1].to_owned())
        });
        let kind = match access {
            Some(access) => format!("KASAN: {} {access}", &c[1]),
            None => format!("KASAN: {}", &c[1]),
        };
        return Some(format!("{kind} in {}", bare_function(&c[2])));
    }
    if let Some(c) = regex(&KMSAN, r"^(?:BUG: )?KMSAN: ([a-z0-9-]+) in ([^\s]+)").captures(first) {
        return Some(format!("KMSAN: {} in {}", &c[1], bare_function(&c[2])));
    }
    if let Some(c) = regex(
        &KCSAN,
        r"^(?:BUG: )?KCSAN: ([a-z0-9-]+) in ([^\s]+)(?: / ([^\s]+))?",
    )
    .captures(first)
    {
        let mut title = format!("KCSAN: {} in {}", &c[1], bare_function(&c[2]));
        if let Some(second) = c.get(3) {
            title.push_str(&format!(" / {}", bare_function(second.as_str())));
        }
        return Some(title);
    }
    if let Some(c) = regex(&UBSAN, r"^UBSAN: ([a-z0-9-]+) in ").captures(first) {
        return Some(with_function(
            &format!("UBSAN: {}", &c[1]),
            stack_function(lines),
        ));
    }
    if let Some(c) = regex(
        &WARNING,
        r"^WARNING: (?:CPU: \d+ PID: \d+ at \S+ |.* at \S+ )?([A-Za-z0-9_.$]+)\+0x",
    )
    .captures(first)
    {
        return Some(format!("WARNING in {}", bare_function(&c[1])));
    }
    if first.starts_with("WARNING: ") {
        let what = first.trim_start_matches("WARNING: ");
        return Some(with_function(&format!("WARNING: {what}"), None));
    }
    if first.starts_with("BUG: kernel NULL pointer dereference") {
        return Some(with_function(
            "BUG: unable to handle kernel NULL pointer dereference",
            blamed_function(lines),
        ));
    }
    if first.starts_with("BUG: unable to handle page fault")
        || first.starts_with("BUG: unable to handle kernel paging request")
    {
        return Some(with_function(
            "BUG: unable to handle kernel paging request",
            blamed_function(lines),
        ));
    }
    if first.starts_with("general protection fault") {
        return Some(with_function(
            "general protection fault",
            blamed_function(lines),
        ));
    }
    if first.starts_with("kernel BUG at ") {
        return Some(with_function("kernel BUG", blamed_function(lines)));
    }
    if first.starts_with("divide error: ") {
        return Some(with_function("divide error", blamed_function(lines)));
    }
    if first.starts_with("invalid opcode: ") {
        return Some(with_function("invalid opcode", blamed_function(lines)));
    }
    if first.starts_with("INFO: task ") {
        return Some(with_function("INFO: task hung", stack_function(lines)));
    }
    if first.starts_with("INFO: rcu ") {
        return Some(with_function(
            "INFO: rcu detected stall",
            blamed_function(lines),
        ));
    }
    for kind in [
        "BUG: soft lockup",
        "BUG: sleeping function called from invalid context",
        "BUG: scheduling while atomic",
        "BUG: memory leak",
        "BUG: spinlock bad magic",
        "BUG: workqueue leaked lock or atomic",
    ] {
        if first.starts_with(kind) {
            let kind = kind.trim_start_matches("BUG: memory leak").to_owned();
            let kind = if kind.is_empty() {
                "memory leak"
            } else {
                &kind
            };
            return Some(with_function(kind, blamed_function(lines)));
        }
    }
    if let Some(c) = regex(&PANIC, r"^Kernel panic - not syncing: (.*)$").captures(first) {
        return Some(format!("kernel panic: {}", c[1].trim()));
    }
    if let Some(rest) = first.strip_prefix("BUG: ") {
        return Some(format!("BUG: {}", rest.trim()));
    }
    if first.starts_with("Oops: ") {
        return Some(with_function("Oops", blamed_function(lines)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds in awkward chunks: the result must not depend on how the console is split.
    fn boot_titles(detector: &CrashDetector) -> Vec<String> {
        detector
            .boot_reports()
            .into_iter()
            .map(|r| r.title)
            .collect()
    }

    fn feed(detector: &mut CrashDetector, console: &str) {
        for chunk in console.as_bytes().chunks(7) {
            detector.feed(chunk);
        }
    }

    /// The verdict on a console printed entirely while the stimulus ran.
    fn detect(console: &str) -> Option<CrashReport> {
        let mut detector = CrashDetector::new();
        detector.stimulus_started();
        feed(&mut detector, console);
        detector.report()
    }

    /// Boot console, then the stimulus's start, then the stimulus's console.
    fn split(boot: &str, stimulus: &str) -> (Vec<String>, Option<String>) {
        let mut detector = CrashDetector::new();
        feed(&mut detector, boot);
        detector.stimulus_started();
        feed(&mut detector, stimulus);
        let boot_titles = detector.boot_reports().into_iter().map(|r| r.title);
        (boot_titles.collect(), detector.report().map(|r| r.title))
    }

    const BOOT_WARNING: &str = "\
[    0.912345] ------------[ cut here ]------------
[    0.912346] WARNING: CPU: 0 PID: 1 at drivers/base/core.c:100 device_add+0x10/0x80
[    0.912347] Modules linked in:
[    0.912348] RIP: 0010:device_add+0x10/0x80
[    0.912349] ---[ end trace 0000000000000000 ]---
";

    const SYSRQ_PANIC: &str = "\
[    5.1] sysrq: Trigger a crash
[    5.1] Kernel panic - not syncing: sysrq triggered crash
[    5.1] Call Trace:
[    5.1]  sysrq_handle_crash+0x15/0x20
[    5.1] Kernel Offset: disabled
";

    #[test]
    fn a_boot_warning_is_listed_apart_from_the_stimulus_crash() {
        let boot = format!("Linux version 6.12\n{BOOT_WARNING}Run /init as init process\n");
        let stimulus = format!("rrr-agent: running /stimulus\n{SYSRQ_PANIC}");
        let (boot_titles, verdict) = split(&boot, &stimulus);
        assert_eq!(boot_titles, ["WARNING in device_add"]);
        assert_eq!(
            verdict.as_deref(),
            Some("kernel panic: sysrq triggered crash")
        );
    }

    #[test]
    fn a_boot_warning_alone_is_no_verdict() {
        let (boot_titles, verdict) = split(BOOT_WARNING, "rrr-agent: stimulus exited\n");
        assert_eq!(boot_titles, ["WARNING in device_add"]);
        assert_eq!(verdict, None);
    }

    #[test]
    fn with_no_start_every_report_is_a_boot_report() {
        // The guest died during boot: the panic is the kernel's, not the stimulus's.
        let console =
            format!("{BOOT_WARNING}Kernel panic - not syncing: VFS: Unable to mount root fs\n");
        let mut detector = CrashDetector::new();
        feed(&mut detector, &console);
        let titles = boot_titles(&detector);
        assert_eq!(
            titles,
            [
                "WARNING in device_add",
                "kernel panic: VFS: Unable to mount root fs"
            ]
        );
        assert_eq!(detector.report(), None);
    }

    #[test]
    fn a_boot_report_with_no_end_line_stops_at_the_start() {
        // `BUG: sleeping function called...` has no end line: without the split it would run on
        // into the stimulus's output.
        let boot = "\
BUG: sleeping function called from invalid context at mm/slab.c:1
Call Trace:
 __might_resched+0x100/0x120
 kmalloc_trace+0x20/0x40
 early_thing_init+0x10/0x20
";
        let mut detector = CrashDetector::new();
        feed(&mut detector, boot);
        detector.stimulus_started();
        feed(&mut detector, "stimulus says hello\n");
        let reports = detector.boot_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].title,
            "BUG: sleeping function called from invalid context in kmalloc_trace"
        );
        assert!(!reports[0].text.contains("hello"), "{}", reports[0].text);
        assert_eq!(detector.report(), None);
    }

    #[test]
    fn a_line_half_printed_at_the_start_stays_a_boot_line() {
        let mut detector = CrashDetector::new();
        detector.feed(b"[    0.9] WARNING: CPU: 0 PID: 1 at a.c:1 early_fn+0x1/0x2");
        detector.stimulus_started();
        detector.feed(b"\n---[ end trace 0 ]---\nKernel panic - not syncing: late\n");
        let boot = boot_titles(&detector);
        assert_eq!(boot, ["WARNING in early_fn"]);
        assert_eq!(detector.report().unwrap().title, "kernel panic: late");
    }

    #[test]
    fn the_stimulus_report_is_the_first_after_the_start_even_mid_boot_report() {
        // A boot report still open when the stimulus starts ends there; the stimulus's own panic
        // is not taken for the boot report's tail.
        let boot = "INFO: task kworker:12 blocked for more than 143 seconds.\nCall Trace:\n";
        let (boot_titles, verdict) = split(boot, SYSRQ_PANIC);
        assert_eq!(boot_titles, ["INFO: task hung"]);
        assert_eq!(
            verdict.as_deref(),
            Some("kernel panic: sysrq triggered crash")
        );
    }

    #[test]
    fn an_oops_banner_and_its_panic_stay_in_one_report() {
        let console = "\
BUG: kernel NULL pointer dereference, address: 0000000000000000
Oops: Oops: 0000 [#1] PREEMPT SMP
RIP: 0010:do_thing+0x5/0x20
Kernel panic - not syncing: Fatal exception
Kernel Offset: disabled
WARNING: CPU: 0 PID: 1 at a.c:1 later_fn+0x1/0x2
";
        let mut detector = CrashDetector::new();
        feed(&mut detector, console);
        let titles = boot_titles(&detector);
        assert_eq!(
            titles,
            [
                "BUG: unable to handle kernel NULL pointer dereference in do_thing",
                "WARNING in later_fn"
            ]
        );
    }

    #[test]
    fn boot_reports_are_bounded() {
        let mut detector = CrashDetector::new();
        for i in 0..3 * MAX_BOOT_REPORTS {
            feed(
                &mut detector,
                &format!("WARNING: CPU: 0 PID: 1 at a.c:1 fn_{i}+0x1/0x2\n---[ end trace 0 ]---\n"),
            );
        }
        detector.stimulus_started();
        feed(&mut detector, SYSRQ_PANIC);
        let boot = detector.boot_reports();
        assert_eq!(boot.len(), MAX_BOOT_REPORTS);
        assert_eq!(boot[0].title, "WARNING in fn_0");
        assert_eq!(
            detector.report().unwrap().title,
            "kernel panic: sysrq triggered crash"
        );
    }

    #[test]
    fn a_report_cut_off_mid_line_still_has_a_title() {
        let mut detector = CrashDetector::new();
        detector.stimulus_started();
        detector.feed(b"Kernel panic - not syncing: cut off");
        assert_eq!(detector.report().unwrap().title, "kernel panic: cut off");
        // Looking does not change what is seen next.
        detector.feed(b" here\n");
        assert_eq!(
            detector.report().unwrap().title,
            "kernel panic: cut off here"
        );
    }

    #[test]
    fn quiet_console_has_no_report() {
        assert_eq!(
            detect("[    0.000000] Linux version 6.12\nrrr-agent: ready\n"),
            None
        );
    }

    #[test]
    fn warning_is_titled_by_its_function() {
        let console = "\
[   12.345678] ------------[ cut here ]------------
[   12.345679] WARNING: CPU: 0 PID: 5123 at kernel/signal.c:765 signal_wake_up_state+0x8c/0xa0
[   12.345680] Modules linked in:
[   12.345681] RIP: 0010:signal_wake_up_state+0x8c/0xa0
[   12.345690] ---[ end trace 0000000000000000 ]---
";
        assert_eq!(
            detect(console).unwrap().title,
            "WARNING in signal_wake_up_state"
        );
    }

    #[test]
    fn kasan_title_carries_access_kind() {
        let console = "\
[   20.1] ==================================================================
[   20.1] BUG: KASAN: slab-use-after-free in ext4_search_dir+0x1a4/0x2c0
[   20.1] Read of size 1 at addr ffff88801e3c4000 by task repro/5099
";
        assert_eq!(
            detect(console).unwrap().title,
            "KASAN: slab-use-after-free Read in ext4_search_dir"
        );
    }

    #[test]
    fn null_dereference_blames_rip() {
        let console = "\
BUG: kernel NULL pointer dereference, address: 0000000000000000
#PF: supervisor read access in kernel mode
Oops: Oops: 0000 [#1] PREEMPT SMP
RIP: 0010:do_thing.cold+0x5/0x20
Call Trace:
 <TASK>
 ? show_regs+0x10/0x20
 caller_of_thing+0x20/0x40
";
        assert_eq!(
            detect(console).unwrap().title,
            "BUG: unable to handle kernel NULL pointer dereference in do_thing"
        );
    }

    #[test]
    fn sysrq_crash_is_a_kernel_panic() {
        let console = "\
[    5.1] sysrq: Trigger a crash
[    5.1] Kernel panic - not syncing: sysrq triggered crash
[    5.1] CPU: 0 UID: 0 PID: 61 Comm: stimulus Not tainted 6.12.57 #1
[    5.1] Call Trace:
[    5.1]  <TASK>
[    5.1]  dump_stack_lvl+0x2b/0x40
[    5.1]  panic+0x10c/0x2a0
[    5.1]  sysrq_handle_crash+0x15/0x20
[    5.1] Kernel Offset: disabled
";
        let report = detect(console).unwrap();
        assert_eq!(report.title, "kernel panic: sysrq triggered crash");
        assert!(report.text.contains("sysrq_handle_crash"));
    }

    #[test]
    fn hung_task_and_ubsan_blame_the_first_real_frame() {
        let hung = "\
INFO: task repro:5100 blocked for more than 143 seconds.
Call Trace:
 <TASK>
 __schedule+0x100/0x200
 schedule+0x10/0x20
 rwsem_down_write_slowpath+0x300/0x500
 down_write+0x20/0x30
 lock_rename+0x40/0x80
";
        assert_eq!(
            detect(hung).unwrap().title,
            "INFO: task hung in lock_rename"
        );
        let ubsan = "\
UBSAN: shift-out-of-bounds in fs/ext4/super.c:4321:9
shift exponent 64 is too large
Call Trace:
 <TASK>
 dump_stack_lvl+0x2b/0x40
 __ubsan_handle_shift_out_of_bounds+0x100/0x200
 ext4_fill_super+0x900/0x1000
";
        assert_eq!(
            detect(ubsan).unwrap().title,
            "UBSAN: shift-out-of-bounds in ext4_fill_super"
        );
    }

    #[test]
    fn general_protection_fault_and_kernel_bug() {
        let gpf = "general protection fault, probably for non-canonical address 0xdffffc0000000000: 0000 [#1]\nRIP: 0010:__list_del_entry+0x10/0x30\n";
        assert_eq!(
            detect(gpf).unwrap().title,
            "general protection fault in __list_del_entry"
        );
        let gpf_6x = "Oops: general protection fault, probably for non-canonical address 0xdffffc0000000000: 0000 [#1] PREEMPT SMP KASAN NOPTI\nRIP: 0010:__list_del_entry+0x10/0x30\n";
        assert_eq!(
            detect(gpf_6x).unwrap().title,
            "general protection fault in __list_del_entry"
        );
        let ud_6x = "Oops: invalid opcode: 0000 [#1] PREEMPT SMP\nRIP: 0010:do_thing+0x4/0x10\n";
        assert_eq!(detect(ud_6x).unwrap().title, "invalid opcode in do_thing");
        let bug = "kernel BUG at fs/buffer.c:1234!\ninvalid opcode: 0000 [#1]\nRIP: 0010:submit_bh_wbc+0x300/0x320\n";
        assert_eq!(detect(bug).unwrap().title, "kernel BUG in submit_bh_wbc");
    }

    #[test]
    fn only_the_first_report_counts_and_lines_are_bounded() {
        let mut console = String::from("WARNING: CPU: 0 PID: 1 at a.c:1 first_fn+0x1/0x2\n");
        console.push_str("---[ end trace 0 ]---\n");
        console.push_str("WARNING: CPU: 0 PID: 1 at b.c:1 second_fn+0x1/0x2\n");
        assert_eq!(detect(&console).unwrap().title, "WARNING in first_fn");

        let mut detector = CrashDetector::new();
        detector.stimulus_started();
        detector.feed(b"BUG: soft lockup - CPU#0 stuck for 22s!\n");
        detector.feed(&vec![b'x'; 1 << 20]);
        detector.feed(b"\n");
        let report = detector.report().unwrap();
        assert!(report.text.len() < 2 * MAX_LINE_BYTES);
    }
}

//! The guest console during `rrr run`: to the terminal, to `console.log`, and to the crash
//! detector, which must know which console bytes came before the stimulus started.
//!
//! Where the split falls: the agent's READY on the control port. Console bytes and control-port
//! words are both synchronous exits handled in order on the vCPU thread, and the UART hands each
//! byte to this writer as the guest writes it, so asking the control port "READY yet?" before
//! each write puts the mark at exactly the right byte. READY is the snapshot point (everything a
//! recording holds comes after it), and the agent reads GO with its very next instruction, since
//! `rrr run` never holds GO. The kernel's own printk to the serial console is synchronous on our
//! one CPU, so a report the kernel printed during boot has reached the UART before READY.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use rrr_reports::CrashDetector;
use rrr_vmm::bus::lock;
use rrr_vmm::devices::control::ControlPort;

/// The control port, known once the VM is built (after the console writer has been handed to
/// the UART).
pub type ControlSlot = Arc<OnceLock<Arc<Mutex<ControlPort>>>>;

/// The console goes to the terminal (unless quiet), to `console.log`, and to the crash detector.
pub struct ConsoleTee<W: Write = std::io::Stdout> {
    pub terminal: Option<W>,
    pub log: File,
    pub detector: Arc<Mutex<CrashDetector>>,
    pub control: ControlSlot,
}

impl<W: Write> ConsoleTee<W> {
    /// Tells the detector the stimulus has started, the first time the console is written
    /// after the agent's READY.
    fn mark_stimulus_start(&self, detector: &mut CrashDetector) {
        if detector.in_stimulus() {
            return;
        }
        if self
            .control
            .get()
            .is_some_and(|control| lock(control).ready_seen())
        {
            detector.stimulus_started();
        }
    }
}

impl<W: Write> Write for ConsoleTee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The run record comes first: a terminal that goes away (stdout a pipe whose reader
        // left) must not cut the log or the crash detector short.
        self.log.write_all(buf)?;
        if let Some(out) = &mut self.terminal {
            if let Err(err) = out.write_all(buf).and_then(|()| out.flush()) {
                tracing::debug!("stdout closed ({err}); the console goes on to the log only");
                self.terminal = None;
            }
        }
        let mut detector = lock(&self.detector);
        self.mark_stimulus_start(&mut detector);
        detector.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.log.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrr_guest::protocol::{Command, Message};
    use rrr_vmm::bus::{BusDevice, DeviceContext};
    use rrr_vmm::clock::VirtualTime;
    use rrr_vmm::irq::IrqLines;

    /// The agent's `outl` of a message, as the run loop hands it to the control port.
    fn agent_says(control: &Arc<Mutex<ControlPort>>, command: Command) {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let word = Message {
            command,
            argument: 0,
        }
        .encode();
        lock(control).write(&mut cx, 0, 0, &word.to_le_bytes());
    }

    /// A tee on a real control port, as `run_vm` wires it, and the UART's byte-at-a-time writes.
    struct Rig {
        tee: ConsoleTee<File>,
        detector: Arc<Mutex<CrashDetector>>,
        control: Arc<Mutex<ControlPort>>,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let detector = Arc::new(Mutex::new(CrashDetector::new()));
            let control = Arc::new(Mutex::new(ControlPort::new(30)));
            let slot = ControlSlot::default();
            let tee = ConsoleTee {
                terminal: None,
                log: File::create(dir.path().join("console.log")).unwrap(),
                detector: detector.clone(),
                control: slot.clone(),
            };
            slot.set(control.clone()).unwrap();
            Rig {
                tee,
                detector,
                control,
                _dir: dir,
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self._dir.path().join("console.log")).unwrap()
        }

        fn uart(&mut self, text: &str) {
            for byte in text.as_bytes() {
                self.tee.write_all(std::slice::from_ref(byte)).unwrap();
            }
        }

        fn titles(&self) -> (Vec<String>, Option<String>) {
            let detector = lock(&self.detector);
            let boot = detector.boot_reports().into_iter().map(|r| r.title);
            (boot.collect(), detector.report().map(|r| r.title))
        }
    }

    const WARNING: &str = "WARNING: CPU: 0 PID: 1 at init/main.c:1 do_one_initcall+0x10/0x80\n\
                           ---[ end trace 0000000000000000 ]---\n";
    const PANIC: &str =
        "Kernel panic - not syncing: sysrq triggered crash\nKernel Offset: disabled\n";

    #[test]
    fn ready_on_the_control_port_splits_boot_from_stimulus() {
        let mut rig = Rig::new();
        rig.uart(WARNING);
        rig.uart("Run /init as init process\n");
        agent_says(&rig.control, Command::Ready);
        rig.uart("rrr-agent: running /stimulus\n");
        rig.uart(PANIC);
        assert_eq!(
            rig.titles(),
            (
                vec!["WARNING in do_one_initcall".to_owned()],
                Some("kernel panic: sysrq triggered crash".to_owned())
            )
        );
    }

    #[test]
    fn without_ready_the_panic_is_a_boot_report() {
        let mut rig = Rig::new();
        rig.uart(WARNING);
        agent_says(&rig.control, Command::PowerOff);
        rig.uart(PANIC);
        let (boot, verdict) = rig.titles();
        assert_eq!(boot.len(), 2, "{boot:?}");
        assert_eq!(verdict, None);
    }

    #[test]
    fn a_warning_after_ready_is_the_stimulus_report() {
        let mut rig = Rig::new();
        agent_says(&rig.control, Command::Ready);
        rig.uart(WARNING);
        assert_eq!(
            rig.titles(),
            (Vec::new(), Some("WARNING in do_one_initcall".to_owned()))
        );
    }

    #[test]
    fn a_closed_terminal_cuts_neither_the_log_nor_the_crash_report() {
        let mut rig = Rig::new();
        // A pipe whose reader has gone: writes fail with EPIPE (Rust ignores SIGPIPE).
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds; the write end is then owned by the File.
        let terminal = unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            libc::close(fds[0]);
            <File as std::os::fd::FromRawFd>::from_raw_fd(fds[1])
        };
        rig.tee.terminal = Some(terminal);
        agent_says(&rig.control, Command::Ready);
        rig.uart("before\n");
        rig.uart(PANIC);
        assert!(rig.tee.terminal.is_none(), "the failed terminal was kept");
        assert_eq!(rig.log(), format!("before\n{PANIC}"));
        assert_eq!(
            rig.titles().1.as_deref(),
            Some("kernel panic: sysrq triggered crash")
        );
    }
}

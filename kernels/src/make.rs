//! Running kbuild: every line goes to the build log, the interesting ones to the progress
//! reporter, and on failure the compiler's error lines are pulled out of the log.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use crate::error::KernelError;

/// Runs `cmd`, appending its stdout and stderr to `log`; `on_line` sees each line as it comes.
/// Returns the exit status text on failure.
pub fn run_logged(
    cmd: &mut Command,
    log: &Path,
    on_line: &dyn Fn(&str),
) -> Result<Result<(), String>, KernelError> {
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(KernelError::io(log))?;
    writeln!(log_file, "$ {}", format!("{cmd:?}").replace('"', ""))
        .map_err(KernelError::io(log))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelError::Spawn {
            command: format!("{:?}", cmd.get_program()),
            source,
        })?;

    // Two reader threads feed one channel; this thread owns the log and the (non-Send) reporter.
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ]
    .into_iter()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);
    for line in rx {
        writeln!(log_file, "{line}").map_err(KernelError::io(log))?;
        on_line(&line);
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait().map_err(KernelError::io(log))?;
    Ok(if status.success() {
        Ok(())
    } else {
        Err(status.to_string())
    })
}

/// A short progress text for a kbuild line (`CC kernel/fork.o`), or `None` for noise.
pub fn step_of(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let tag = words.next()?;
    let what = words.next()?;
    let is_step = tag.len() <= 8
        && tag
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && line.starts_with("  ");
    is_step.then(|| format!("{tag} {what}"))
}

/// Whether a kbuild line starts linking the kernel: `LD vmlinux.o` (6.x links the built-in
/// objects into it first), a `.tmp_vmlinux` kallsyms pass, or `vmlinux` itself.
pub fn starts_link(line: &str) -> bool {
    let mut words = line.split_whitespace();
    words.next() == Some("LD")
        && words
            .next()
            .is_some_and(|t| t == "vmlinux.o" || t == "vmlinux" || t.starts_with(".tmp_vmlinux"))
}

/// The error lines of a failed build with two lines of context before each, at most `max` lines.
pub fn error_excerpt(log_text: &str, max: usize) -> String {
    let lines: Vec<&str> = log_text.lines().collect();
    let mut keep = vec![false; lines.len()];
    for (i, line) in lines.iter().enumerate() {
        let lower = line.to_ascii_lowercase();
        if lower.contains("error:") || lower.contains("error ") && line.contains("***") {
            for k in keep.iter_mut().take(i + 1).skip(i.saturating_sub(2)) {
                *k = true;
            }
        }
    }
    let picked: Vec<&str> = lines
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(l, _)| *l)
        .collect();
    if picked.is_empty() {
        // No recognizable error line: the end of the log is the best guess.
        let start = lines.len().saturating_sub(max);
        return lines[start..].join("\n");
    }
    let start = picked.len().saturating_sub(max);
    picked[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_kbuild_tags() {
        assert_eq!(
            step_of("  CC      kernel/fork.o").as_deref(),
            Some("CC kernel/fork.o")
        );
        assert_eq!(step_of("  LD      vmlinux").as_deref(), Some("LD vmlinux"));
        assert_eq!(step_of("make[1]: Entering directory"), None);
        assert_eq!(step_of("kernel/fork.c:12:3: error: x"), None);
    }

    #[test]
    fn linking_starts_with_the_first_vmlinux_link() {
        assert!(starts_link("  LD      vmlinux.o"));
        assert!(starts_link("  LD      .tmp_vmlinux1"));
        assert!(starts_link("  LD      vmlinux"));
        assert!(!starts_link("  LD      arch/x86/boot/setup.elf"));
        assert!(!starts_link("  CC      vmlinux.o"));
    }

    #[test]
    fn error_excerpt_keeps_errors_with_context() {
        let log =
            "  CC a.o\n  CC b.o\nb.c: In function 'f':\nb.c:3:5: error: 'x' undeclared\n  CC c.o\n\
                   make[2]: *** [b.o] Error 1\nmake: *** [all] Error 2\n";
        let text = error_excerpt(log, 20);
        assert!(text.contains("b.c: In function 'f':"), "{text}");
        assert!(text.contains("error: 'x' undeclared"));
        assert!(text.contains("*** [b.o] Error 1"));
        assert!(!text.contains("CC a.o"));
    }

    #[test]
    fn run_logged_captures_both_streams_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let seen = std::cell::RefCell::new(Vec::new());
        let result = run_logged(
            Command::new("sh").args(["-c", "echo one; echo two >&2; exit 3"]),
            &log,
            &|l| seen.borrow_mut().push(l.to_owned()),
        )
        .unwrap();
        assert!(result.is_err());
        let mut seen = seen.into_inner();
        seen.sort();
        assert_eq!(seen, ["one", "two"]);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("one") && text.contains("two"));
    }
}

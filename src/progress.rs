//! Progress on stderr for long steps. Stdout is reserved for results so commands compose.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with a message, drawn on stderr (hidden when stderr is not a terminal).
pub fn spinner(message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .expect("static template is valid"),
    );
    bar.set_message(message.into());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Reports the stages of a long job on stderr: on a terminal, a spinner with the elapsed time,
/// the stage and its latest step; elsewhere (a log, CI), a line when a stage begins and one with
/// its elapsed time when it ends, so a silent five-minute build cannot be mistaken for a hang.
pub struct Stages {
    what: String,
    bar: Option<ProgressBar>,
    current: Option<(&'static str, Instant, u64)>,
}

impl Stages {
    /// `what` names the job in every line (`guest kernel`).
    pub fn new(what: impl Into<String>) -> Self {
        let what = what.into();
        let bar = std::io::stderr()
            .is_terminal()
            .then(|| spinner(format!("{what}: starting")));
        Stages {
            what,
            bar,
            current: None,
        }
    }

    pub fn stage(&mut self, name: &'static str) {
        self.end_stage();
        match &self.bar {
            Some(bar) => bar.set_message(format!("{}: {name}", self.what)),
            None => eprintln!("rrr: {}: {name}...", self.what),
        }
        self.current = Some((name, Instant::now(), 0));
    }

    pub fn step(&mut self, step: &str) {
        if let Some((name, _, steps)) = &mut self.current {
            *steps += 1;
            if let Some(bar) = &self.bar {
                bar.set_message(format!("{}: {name} ({steps}) {step}", self.what));
            }
        }
    }

    /// The line that ends the current stage, off a terminal.
    fn end_stage(&mut self) {
        if let (Some((name, started, steps)), None) = (self.current.take(), &self.bar) {
            let steps = match steps {
                0 => String::new(),
                1 => ", 1 step".to_owned(),
                n => format!(", {n} steps"),
            };
            eprintln!(
                "rrr: {}: {name} done in {}{steps}",
                self.what,
                elapsed(started.elapsed())
            );
        }
    }

    pub fn finish(mut self) {
        self.end_stage();
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `12.3 s`, or `4 min 05 s` past a minute.
pub fn elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_reads_well() {
        assert_eq!(elapsed(Duration::from_millis(12_340)), "12.3 s");
        assert_eq!(elapsed(Duration::from_secs(245)), "4 min 05 s");
    }
}

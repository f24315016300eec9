//! `rrr demo`: the README's main job on the built-in default. Checks the machine, builds the
//! default kernel and a rootfs with the example stimulus, takes (or restores) the snapshot,
//! records the stimulus, replays the recording with the trace pass, and says where the trace is
//! and how to open it.

use anyhow::{Context, Result};

/// The example stimulus, built into the binary so the demo works from any directory.
const EXAMPLE_STIMULUS: &str = include_str!("../../examples/stimuli/hello.c");

#[derive(clap::Args)]
pub struct Args {
    /// Seconds the example stimulus may run.
    #[arg(long, default_value_t = 30)]
    time_limit: u32,
    /// Do not stream the guest console (it is still saved beside the run).
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: Args) -> Result<i32> {
    eprintln!("==> rrr doctor");
    let doctor = super::doctor::run(super::doctor::Args::default())?;
    if doctor != 0 {
        anyhow::bail!("the machine is missing something rrr needs (see above); fix it and rerun");
    }

    eprintln!("==> the default kernel (Debian's linux-source-6.12, tinyconfig + rrr's fragments)");
    let kernel = super::kernel::ensure_default_kernel()?;
    eprintln!("    {}", kernel.dir.display());

    let stimulus_dir = crate::cache::cache_dir()?.join("demo");
    std::fs::create_dir_all(&stimulus_dir)
        .with_context(|| format!("cannot create {}", stimulus_dir.display()))?;
    let stimulus = stimulus_dir.join("hello.c");
    if std::fs::read_to_string(&stimulus).ok().as_deref() != Some(EXAMPLE_STIMULUS) {
        std::fs::write(&stimulus, EXAMPLE_STIMULUS)
            .with_context(|| format!("cannot write {}", stimulus.display()))?;
    }

    let recording = stimulus_dir.join("hello.rrr");
    eprintln!(
        "==> rrr record {} -o {} --trace (rootfs, snapshot, record, then replay with the trace pass)",
        stimulus.display(),
        recording.display()
    );
    // As the user would type it: the carrier re-executes these words, not `rrr demo`.
    let mut words: Vec<std::ffi::OsString> = vec![
        stimulus.into(),
        "--kernel".into(),
        kernel.dir.clone().into(),
        "--time-limit".into(),
        args.time_limit.to_string().into(),
        "-o".into(),
        recording.into(),
        "--trace".into(),
    ];
    if args.quiet {
        words.push("--quiet".into());
    }
    super::record::run_words(&words)
}

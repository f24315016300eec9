//! `rrr rootfs build`: compile a stimulus into a bootable rootfs image (cached by content).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(clap::Subcommand)]
pub enum RootfsCommand {
    /// Build a qcow2 rootfs: the base image every machine boots (no --stimulus), or one with a
    /// C stimulus program inside (for plain QEMU); prints the image path on stdout.
    Build(BuildArgs),
    /// Compile a stimulus for the stimulus disk (as `rrr run` does); prints the binary's path.
    Stimulus(StimulusArgs),
}

#[derive(clap::Args)]
pub struct StimulusArgs {
    /// The stimulus, a C source file.
    pub stimulus: PathBuf,
    /// Build it as a 32-bit program (needs gcc-multilib).
    #[arg(long)]
    pub m32: bool,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The stimulus, a C source file (built like a syzkaller reproducer: gcc -O2 -g -static),
    /// installed as /stimulus; without it, the base image.
    #[arg(long, value_name = "PROG.c")]
    pub stimulus: Option<PathBuf>,
    /// Also copy the image here.
    #[arg(long, value_name = "IMAGE.qcow2")]
    pub out: Option<PathBuf>,
    /// Build the stimulus as a 32-bit program (needs gcc-multilib).
    #[arg(long)]
    pub m32: bool,
    /// Extra flag for gcc when compiling the stimulus (repeatable).
    #[arg(long = "cflag", value_name = "FLAG", allow_hyphen_values = true)]
    pub cflags: Vec<String>,
}

pub fn run(cmd: RootfsCommand) -> Result<i32> {
    match cmd {
        RootfsCommand::Build(args) => build(args),
        RootfsCommand::Stimulus(args) => {
            println!("{}", ensure_stimulus(&args.stimulus, args.m32)?.display());
            Ok(0)
        }
    }
}

fn build(args: BuildArgs) -> Result<i32> {
    let image = match args.stimulus {
        Some(stimulus) => build_spec(&rrr_rootfs::RootfsSpec {
            stimulus,
            m32: args.m32,
            extra_cflags: args.cflags,
        })?,
        None => ensure_base_rootfs()?,
    };
    let path = match args.out {
        Some(out) => {
            std::fs::copy(&image, &out)
                .with_context(|| format!("cannot copy {} to {}", image.display(), out.display()))?;
            out
        }
        None => image,
    };
    println!("{}", path.display());
    Ok(0)
}

/// The base rootfs (agent and busybox, no stimulus) every machine boots, built if needed.
pub fn ensure_base_rootfs() -> Result<PathBuf> {
    let cache = crate::cache::cache_dir()?;
    let spinner = crate::progress::spinner("building the base rootfs");
    let result = rrr_rootfs::build_base(&cache);
    spinner.finish_and_clear();
    Ok(result.context("cannot build the base rootfs")?.path)
}

/// The stimulus compiled for the stimulus disk, built if needed. Used by `rrr run`.
pub fn ensure_stimulus(stimulus: &Path, m32: bool) -> Result<PathBuf> {
    let cache = crate::cache::cache_dir()?;
    let spinner = crate::progress::spinner(format!("compiling {}", stimulus.display()));
    let result = rrr_rootfs::build_stimulus(
        &rrr_rootfs::RootfsSpec {
            stimulus: stimulus.to_path_buf(),
            m32,
            extra_cflags: Vec::new(),
        },
        &cache,
    );
    spinner.finish_and_clear();
    let binary =
        result.with_context(|| format!("cannot compile the stimulus {}", stimulus.display()))?;
    print_trap_note(binary.traps.as_ref());
    Ok(binary.path)
}

/// The one line saying that rdrand/rdseed were rewritten into traps (on stderr: stdout carries
/// the command's result).
fn print_trap_note(traps: Option<&rrr_rootfs::traps::TrapReport>) {
    if let Some(note) = traps.and_then(|traps| traps.note()) {
        eprintln!("{note}");
    }
}

fn build_spec(spec: &rrr_rootfs::RootfsSpec) -> Result<PathBuf> {
    let cache = crate::cache::cache_dir()?;
    let spinner = crate::progress::spinner(format!(
        "building the rootfs for {}",
        spec.stimulus.display()
    ));
    let result = rrr_rootfs::build(spec, &cache);
    spinner.finish_and_clear();
    let image =
        result.with_context(|| format!("cannot build a rootfs for {}", spec.stimulus.display()))?;
    print_trap_note(image.traps.as_ref());
    if image.cached {
        tracing::info!(image = %image.path.display(), "rootfs from the cache");
    }
    Ok(image.path)
}

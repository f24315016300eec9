//! `rrr kernel build`: build (or find cached) a guest or carrier kernel. Stdout carries only the
//! kernel directory, so `$(rrr kernel build)` works; progress and notes go to stderr.

use std::path::PathBuf;

use anyhow::{Context, Result};
use rrr_kernels::{Flavor, KernelBuild, KernelSpec, Progress, Source};

#[derive(clap::Subcommand)]
pub enum KernelCommand {
    /// Build a kernel and print its cache directory (vmlinux, bzImage, .config, build.log).
    Build(BuildArgs),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// A kernel source tree to build instead of Debian's linux-source-6.12 (never written to).
    #[arg(long, value_name = "DIR")]
    source: Option<PathBuf>,
    /// A full kernel config (e.g. syzbot's) to start from instead of tinyconfig.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// An extra config fragment merged after rrr's own (repeatable).
    #[arg(long, value_name = "FILE")]
    fragment: Vec<PathBuf>,
    /// Build the carrier kernel (QEMU with AMD-V, 9p root) instead of a guest kernel.
    #[arg(long)]
    carrier: bool,
    /// Build with clang and LLVM's tools (`make LLVM=1`), as a config made by clang needs.
    #[arg(long)]
    llvm: bool,
}

pub fn run(cmd: KernelCommand) -> Result<i32> {
    match cmd {
        KernelCommand::Build(args) => {
            let spec = KernelSpec {
                source: args.source.map_or(Source::Debian, Source::Tree),
                base_config: args.config,
                fragments: args.fragment,
                flavor: if args.carrier {
                    Flavor::Carrier
                } else {
                    Flavor::Guest
                },
                toolchain: if args.llvm {
                    rrr_kernels::Toolchain::Llvm
                } else {
                    rrr_kernels::Toolchain::Gcc
                },
            };
            let (kernel, cached) = ensure_reporting(&spec)?;
            if cached {
                eprintln!(
                    "rrr: {} kernel: cached at {}",
                    spec.flavor.name(),
                    kernel.dir.display()
                );
            }
            println!("{}", kernel.dir.display());
            Ok(0)
        }
    }
}

/// The default guest kernel (Debian source, tinyconfig plus rrr's fragments), built if needed.
pub fn ensure_default_kernel() -> Result<KernelBuild> {
    ensure(&KernelSpec::default())
}

/// The carrier kernel, built if needed.
pub fn ensure_carrier_kernel() -> Result<KernelBuild> {
    ensure(&KernelSpec::carrier())
}

/// Finds `spec` in the cache or builds it with a spinner on stderr.
pub fn ensure(spec: &KernelSpec) -> Result<KernelBuild> {
    ensure_reporting(spec).map(|(kernel, _)| kernel)
}

/// [`ensure`], also saying whether the kernel came from the cache.
fn ensure_reporting(spec: &KernelSpec) -> Result<(KernelBuild, bool)> {
    let cache = crate::cache::cache_dir()?;
    let what = format!("{} kernel", spec.flavor.name());
    if let Some(hit) = rrr_kernels::cached(spec, &cache)
        .with_context(|| format!("cannot look up the {what} in the cache"))?
    {
        tracing::info!("{what}: cached at {}", hit.dir.display());
        return Ok((hit, true));
    }
    let stages = std::cell::RefCell::new(crate::progress::Stages::new(&what));
    let started = std::time::Instant::now();
    let result = rrr_kernels::build(spec, &cache, &|progress| match progress {
        Progress::Stage(stage) => stages.borrow_mut().stage(stage.name()),
        Progress::Step(step) => stages.borrow_mut().step(step),
    });
    stages.into_inner().finish();
    let kernel = result.with_context(|| format!("cannot build the {what}"))?;
    eprintln!(
        "rrr: {what}: built in {} at {}",
        crate::progress::elapsed(started.elapsed()),
        kernel.dir.display()
    );
    Ok((kernel, false))
}

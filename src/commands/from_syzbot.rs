//! `rrr from-syzbot <bug>`: from a syzbot bug to a recording of its reproducer on the kernel it
//! crashed, and a trace of that recording, as a pipeline of stages (fetch, kernel source,
//! config, build, snapshot, record, trace). Each stage says what it does and how long it took;
//! the stages up to the snapshot keep their products in the bug's work directory or in rrr's
//! cache, so a rerun skips what is done.
//!
//! `--repro FILE --config FILE --kernel-src DIR` runs the same stages from local files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rrr_kernels::{Flavor, KernelSpec, Source};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::syzbot::client::{Origin, DEFAULT_BASE};
use crate::syzbot::config::{self, Evidence};
use crate::syzbot::schema::KernelSource;
use crate::syzbot::title::{self, TitleMatch};
use crate::syzbot::{git, repro, BugRef, Client};

#[derive(clap::Args)]
pub struct Args {
    /// The bug: an extid, a bug id, or its dashboard URL (syzkaller.appspot.com or syzbot.org).
    pub bug: Option<String>,
    /// Which crash of the bug to take everything from (default: the first with a C reproducer).
    #[arg(long, value_name = "N")]
    pub crash: Option<usize>,
    /// The dashboard to ask (a mirror, or a test server).
    #[arg(long, value_name = "URL", env = "RRR_SYZBOT_URL", default_value = DEFAULT_BASE)]
    pub syzbot_url: String,
    /// Use only what is cached: no dashboard, no git fetch.
    #[arg(long)]
    pub offline: bool,
    /// Ask the dashboard for the bug again even if it is cached.
    #[arg(long)]
    pub refresh: bool,
    /// A C reproducer to run instead of the bug's (with --config and --kernel-src: no dashboard).
    #[arg(long, value_name = "FILE")]
    pub repro: Option<PathBuf>,
    /// A kernel config to start from instead of the bug's.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A kernel source tree to build instead of fetching the bug's commit (never written to).
    #[arg(long, value_name = "DIR")]
    pub kernel_src: Option<PathBuf>,
    /// The bug's title, for local runs (decides the config and is compared with the crash).
    #[arg(long, value_name = "TEXT")]
    pub title: Option<String>,
    /// The crash report, for local runs.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Build syzbot's config as is, only adding what rrr needs.
    #[arg(long)]
    pub keep_config: bool,
    /// Seconds the reproducer runs before it is stopped (reproducers never exit on their own).
    #[arg(long, default_value_t = 60)]
    pub time_limit: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = super::run::DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Extra kernel parameters.
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Where to keep the bug's files (default: under the cache, one directory per bug and crash).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Stop after this stage.
    #[arg(long, value_enum, value_name = "STAGE")]
    pub stop_after: Option<Stage>,
    /// Do not stream the guest console.
    #[arg(long, short)]
    pub quiet: bool,
    /// What the trace stage traces (default: every kernel function).
    #[command(flatten)]
    pub trace: crate::trace::TraceArgs,
}

/// The pipeline, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Fetch,
    Source,
    Config,
    Build,
    Snapshot,
    Record,
    Trace,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Source => "kernel source",
            Stage::Config => "config",
            Stage::Build => "build",
            Stage::Snapshot => "snapshot",
            Stage::Record => "record",
            Stage::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Timing {
    stage: Stage,
    secs: f64,
    /// Everything came from the cache.
    cached: bool,
}

/// Runs stages in order, printing each one's progress and time.
struct Pipeline {
    stop_after: Stage,
    timings: Vec<Timing>,
}

impl Pipeline {
    /// Runs `stage` unless an earlier stage was the last wanted; `f` returns its product and
    /// whether it came from the cache.
    fn stage<T>(
        &mut self,
        stage: Stage,
        f: impl FnOnce(&dyn Fn(&str)) -> Result<(T, bool)>,
    ) -> Result<Option<T>> {
        if self
            .timings
            .last()
            .is_some_and(|t| t.stage >= self.stop_after)
        {
            return Ok(None);
        }
        let started = Instant::now();
        let say = |what: &str| eprintln!("rrr: [{}] {what}", stage.name());
        let (value, cached) = f(&say).with_context(|| format!("stage {} failed", stage.name()))?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "rrr: [{}] done in {secs:.1} s{}",
            stage.name(),
            if cached { " (cached)" } else { "" }
        );
        self.timings.push(Timing {
            stage,
            secs,
            cached,
        });
        Ok(Some(value))
    }
}

/// What the fetch stage hands on: the texts, saved in the work directory.
struct Inputs {
    title: Option<String>,
    bug_url: Option<String>,
    crash_index: Option<usize>,
    /// The bug's commit, when the kernel comes from syzbot.
    source: Option<KernelSource>,
    repro_path: PathBuf,
    repro: String,
    repro_opts: String,
    config: String,
    report: String,
    work: PathBuf,
}

/// `from-syzbot.json` in the run directory's parent: the verdict and the stage times.
#[derive(Debug, Serialize)]
struct Verdict<'a> {
    bug_title: Option<&'a str>,
    bug_url: Option<&'a str>,
    crash_index: Option<usize>,
    kernel_source: Option<&'a KernelSource>,
    kernel: Option<PathBuf>,
    config_changes: Option<PathBuf>,
    m32: Option<String>,
    run_dir: Option<PathBuf>,
    recording: Option<PathBuf>,
    trace: Option<PathBuf>,
    crashed: Option<bool>,
    crash_title: Option<String>,
    title_match: Option<TitleMatch>,
    stages: &'a [Timing],
}

pub fn run(args: Args) -> Result<i32> {
    let cache = crate::cache::cache_dir()?;
    let mut pipeline = Pipeline {
        stop_after: args.stop_after.unwrap_or(Stage::Trace),
        timings: Vec::new(),
    };
    let started = Instant::now();

    let inputs = pipeline
        .stage(Stage::Fetch, |say| fetch(&args, &cache, say))?
        .expect("the first stage always runs");
    let mut verdict = Verdict {
        bug_title: inputs.title.as_deref(),
        bug_url: inputs.bug_url.as_deref(),
        crash_index: inputs.crash_index,
        kernel_source: inputs.source.as_ref(),
        kernel: None,
        config_changes: None,
        m32: repro::needs_m32(&inputs.repro, &inputs.repro_opts),
        run_dir: None,
        recording: None,
        trace: None,
        crashed: None,
        crash_title: None,
        title_match: None,
        stages: &[],
    };

    let source = pipeline.stage(Stage::Source, |say| {
        kernel_source(&args, &inputs, &cache, say)
    })?;
    let plan = match &source {
        Some(source) => pipeline.stage(Stage::Config, |say| {
            plan_config(&args, &inputs, source.dir(), say).map(|p| (p, false))
        })?,
        None => None,
    };
    let kernel = match (&source, &plan) {
        (Some(source), Some(plan)) => {
            verdict.config_changes = Some(inputs.work.join(CHANGES_FILE));
            pipeline.stage(Stage::Build, |say| build(source, plan, &inputs.work, say))?
        }
        _ => None,
    };
    if let Some(kernel) = &kernel {
        verdict.kernel = Some(kernel.dir.clone());
        pipeline.stage(Stage::Snapshot, |say| snapshot(&args, kernel, say))?;
    }
    let recording = inputs.work.join("recording.rrr");
    let summary = match &kernel {
        Some(kernel) => pipeline.stage(Stage::Record, |say| {
            record_repro(
                &args,
                &inputs,
                kernel,
                &recording,
                verdict.m32.is_some(),
                say,
            )
        })?,
        None => None,
    };
    if summary.is_some() {
        verdict.recording = Some(recording.clone());
        let trace = args.trace.output_for(&recording);
        if let Some(()) = pipeline.stage(Stage::Trace, |say| {
            trace_recording(&args, &recording, &trace, say)
        })? {
            verdict.trace = Some(trace);
        }
    }
    if let Some((run_dir, summary)) = &summary {
        verdict.run_dir = Some(run_dir.clone());
        verdict.crashed = Some(summary.crash_title.is_some());
        verdict.crash_title = summary.crash_title.clone();
        verdict.title_match = match (&inputs.title, &summary.crash_title) {
            (Some(bug), Some(seen)) => Some(title::compare(bug, seen)),
            _ => None,
        };
    }
    let timings = pipeline.timings.clone();
    verdict.stages = &timings;
    let json = serde_json::to_string_pretty(&verdict)? + "\n";
    let verdict_path = inputs.work.join("from-syzbot.json");
    std::fs::write(&verdict_path, &json)
        .with_context(|| format!("cannot write {}", verdict_path.display()))?;
    print_verdict(&verdict, &verdict_path, started);
    Ok(0)
}

const CHANGES_FILE: &str = "config-changes.txt";

fn fetch(args: &Args, cache: &Path, say: &dyn Fn(&str)) -> Result<(Inputs, bool)> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let local = (&args.repro, &args.config, &args.kernel_src);
    if args.bug.is_none() {
        let (Some(repro), Some(config), Some(_)) = local else {
            bail!(
                "name a syzbot bug (extid, id or URL), or give all of --repro FILE, --config FILE \
                 and --kernel-src DIR to run from local files"
            );
        };
        let repro_text = read(repro)?;
        let config_text = read(config)?;
        let report = args
            .report
            .as_deref()
            .map(read)
            .transpose()?
            .unwrap_or_default();
        let key = hex::encode(Sha256::digest(format!("{repro_text}\0{config_text}")));
        let work = match &args.work_dir {
            Some(dir) => dir.clone(),
            None => cache.join("syzbot").join("local").join(&key[..16]),
        };
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        say(&format!("local files; work directory {}", work.display()));
        let repro_path = save(&work, "repro.c", &repro_text)?;
        save(&work, "syzbot.config", &config_text)?;
        save(&work, "report.txt", &report)?;
        return Ok((
            Inputs {
                title: args.title.clone(),
                bug_url: None,
                crash_index: None,
                source: None,
                repro_path,
                repro: repro_text,
                repro_opts: String::new(),
                config: config_text,
                report,
                work,
            },
            true,
        ));
    }
    let reference = BugRef::parse(args.bug.as_deref().unwrap_or_default())?;
    let client = Client::new(&args.syzbot_url, cache)
        .offline(args.offline)
        .refresh(args.refresh);
    say(&format!("bug {reference} from {}", client.base()));
    let (bug, bug_url, origin) = client.bug(&reference)?;
    let mut cached = origin == Origin::Cache;
    let picked = bug.pick(args.crash)?;
    say(&format!(
        "\"{}\": crash {} of {}, kernel {} at {}",
        bug.title,
        picked.index,
        bug.crashes.len(),
        picked.source.repo,
        picked.source.commit
    ));
    let work = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => cache.join("syzbot").join("bugs").join(format!(
            "{}-crash{}",
            reference.key(),
            picked.index
        )),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut text = |link: &str, what: &str| -> Result<String> {
        let (body, url, origin) = client.text(link)?;
        cached &= origin == Origin::Cache;
        say(&format!(
            "{what}: {} bytes from {}",
            body.len(),
            if origin == Origin::Cache {
                "the cache"
            } else {
                url.as_str()
            }
        ));
        Ok(body)
    };
    let repro_text = match &args.repro {
        Some(path) => read(path)?,
        None => text(&picked.crash.c_reproducer, "C reproducer")?,
    };
    let config_text = match &args.config {
        Some(path) => read(path)?,
        None => text(&picked.crash.kernel_config, "kernel config")?,
    };
    let report = match (&args.report, picked.crash.crash_report_link.trim()) {
        (Some(path), _) => read(path)?,
        (None, "") => String::new(),
        (None, link) => text(link, "crash report")?,
    };
    save(
        &work,
        "bug.json",
        &(serde_json::to_string_pretty(&bug)? + "\n"),
    )?;
    let repro_path = save(&work, "repro.c", &repro_text)?;
    save(&work, "syzbot.config", &config_text)?;
    save(&work, "report.txt", &report)?;
    let title = args.title.clone().unwrap_or_else(|| bug.title.clone());
    Ok((
        Inputs {
            title: Some(title),
            bug_url: Some(bug_url),
            crash_index: Some(picked.index),
            source: Some(picked.source.clone()),
            repro_path,
            repro: repro_text,
            repro_opts: picked.crash.repro_opts.clone(),
            config: config_text,
            report,
            work,
        },
        cached,
    ))
}

fn save(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The kernel tree and how the kernel cache knows it.
enum KernelTree {
    /// Debian's extracted source (the user pointed at it): the default kernel's cache applies.
    Debian(PathBuf),
    Tree(PathBuf),
}

impl KernelTree {
    fn dir(&self) -> &Path {
        match self {
            KernelTree::Debian(dir) | KernelTree::Tree(dir) => dir,
        }
    }
    fn source(&self) -> Source {
        match self {
            KernelTree::Debian(_) => Source::Debian,
            KernelTree::Tree(dir) => Source::Tree(dir.clone()),
        }
    }
}

fn kernel_source(
    args: &Args,
    inputs: &Inputs,
    cache: &Path,
    say: &dyn Fn(&str),
) -> Result<(KernelTree, bool)> {
    if let Some(dir) = &args.kernel_src {
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("kernel source {} does not exist", dir.display()))?;
        // rrr's own extraction of Debian's source is the default kernel's source: building it
        // as `Source::Debian` shares the default kernel's cache entries.
        let debian = rrr_kernels::source::debian_version().ok().map(|version| {
            cache
                .join("sources")
                .join(format!("{}_{version}", rrr_kernels::source::DEBIAN_PACKAGE))
        });
        let is_debian = debian
            .and_then(|d| std::fs::canonicalize(d).ok())
            .is_some_and(|d| d == dir);
        say(&format!(
            "{}{}",
            dir.display(),
            if is_debian {
                " (Debian's linux-source)"
            } else {
                ""
            }
        ));
        let tree = if is_debian {
            KernelTree::Debian(dir)
        } else {
            KernelTree::Tree(dir)
        };
        return Ok((tree, true));
    }
    let source = inputs
        .source
        .as_ref()
        .context("no kernel source: pass --kernel-src DIR")?;
    let checkout = git::checkout(source, cache, args.offline, say)?;
    say(&format!("{} at {}", checkout.dir.display(), source.commit));
    Ok((KernelTree::Tree(checkout.dir), !checkout.fetched))
}

fn plan_config(
    args: &Args,
    inputs: &Inputs,
    source_dir: &Path,
    say: &dyn Fn(&str),
) -> Result<config::Plan> {
    let title = inputs.title.as_deref().unwrap_or("");
    let evidence = Evidence::new(title, &inputs.report, &inputs.repro).with_source(source_dir);
    let plan = config::plan(&inputs.config, &evidence, !args.keep_config);
    let text = plan.changes_text();
    for line in text.lines() {
        say(line);
    }
    if plan.removed.is_empty() && !args.keep_config {
        say("nothing to remove: the report needs everything the config has");
    }
    save(&inputs.work, CHANGES_FILE, &text)?;
    save(&inputs.work, "rrr-base.config", &plan.base)?;
    Ok(plan)
}

fn build(
    tree: &KernelTree,
    plan: &config::Plan,
    work: &Path,
    say: &dyn Fn(&str),
) -> Result<(rrr_kernels::KernelBuild, bool)> {
    let mut fragments = Vec::new();
    for (i, text) in plan.fragments.iter().enumerate() {
        fragments.push(save(work, &format!("rrr-fragment-{i}.config"), text)?);
    }
    let spec = KernelSpec {
        source: tree.source(),
        base_config: Some(work.join("rrr-base.config")),
        fragments,
        flavor: Flavor::Guest,
        // A config made by clang keeps its clang-only options only when clang configures it.
        toolchain: if plan.clang {
            rrr_kernels::Toolchain::Llvm
        } else {
            rrr_kernels::Toolchain::Gcc
        },
    };
    let cache = crate::cache::cache_dir()?;
    let stage_start = std::time::SystemTime::now();
    let hit = rrr_kernels::cached(&spec, &cache).context("cannot look up the kernel cache")?;
    let kernel = match hit {
        Some(hit) => hit,
        None => {
            say("configuring and building (a cache hit after Kconfig skips the build)");
            super::kernel::ensure(&spec)?
        }
    };
    // A miss in the inputs index can still find the build after Kconfig (same final config).
    let cached = std::fs::metadata(kernel.dir.join("build.json"))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t < stage_start);
    say(&format!("kernel {}", kernel.dir.display()));
    // The changes beside the build they made.
    let link = work.join("kernel");
    let _ = std::fs::remove_file(&link);
    let _ = std::os::unix::fs::symlink(&kernel.dir, &link);
    let _ = std::fs::copy(
        work.join(CHANGES_FILE),
        kernel.dir.join("rrr-syzbot-changes.txt"),
    );
    Ok((kernel, cached))
}

fn snapshot(
    args: &Args,
    kernel: &rrr_kernels::KernelBuild,
    say: &dyn Fn(&str),
) -> Result<((), bool)> {
    say("the machine at the agent's READY (taken once per kernel, then checked)");
    // The snapshot is keyed inside the carrier (by its CPU model), so whether it was cached is
    // read afterwards: no snapshot file newer than this stage's start.
    let snapshots = crate::cache::cache_dir()?.join("snapshots");
    let stage_start = std::time::SystemTime::now();
    let mut words: Vec<std::ffi::OsString> = vec![
        "--kernel".into(),
        kernel.dir.clone().into(),
        "--mem".into(),
        args.mem.to_string().into(),
    ];
    if let Some(append) = &args.append {
        words.extend(["--append".into(), append.into()]);
    }
    let code = super::snapshot::run_words(&words)?;
    if code != 0 {
        bail!("taking the snapshot failed (exit status {code})");
    }
    let taken = std::fs::read_dir(&snapshots)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "rrrsnap"))
        .any(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= stage_start)
        });
    Ok(((), !taken))
}

/// The trace stage: the recording replayed with the trace pass (every check of a replay still
/// applies: a traced replay that parts from the recording fails the stage).
fn trace_recording(
    args: &Args,
    recording: &Path,
    trace: &Path,
    say: &dyn Fn(&str),
) -> Result<((), bool)> {
    say(&format!(
        "replaying {} with the trace pass",
        recording.display()
    ));
    let code = super::trace::run(super::trace::Args {
        recording: recording.to_owned(),
        trace: crate::trace::TraceArgs {
            output: Some(trace.to_owned()),
            ..args.trace.clone()
        },
        partial: false,
        console: false,
        direct: false,
        kernel: None,
        rootfs: None,
        serve: false,
        port: rrr_perfetto::DEFAULT_PORT,
    })?;
    if code != 0 {
        bail!(
            "the traced replay of {} ended with exit status {code} (see above)",
            recording.display()
        );
    }
    Ok(((), false))
}

/// The record stage: the reproducer run under its time limit and recorded.
fn record_repro(
    args: &Args,
    inputs: &Inputs,
    kernel: &rrr_kernels::KernelBuild,
    recording: &Path,
    m32: bool,
    say: &dyn Fn(&str),
) -> Result<((PathBuf, super::run::RunSummary), bool)> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let run_dir = inputs.work.join("runs").join(stamp.to_string());
    say(&format!(
        "{} for {} s{}",
        inputs.repro_path.display(),
        args.time_limit,
        if m32 { ", built 32-bit" } else { "" }
    ));
    // As the user would type it: inside the carrier these words run, not `rrr from-syzbot`.
    let mut words: Vec<std::ffi::OsString> = vec![
        inputs.repro_path.clone().into(),
        "--kernel".into(),
        kernel.dir.clone().into(),
        "--time-limit".into(),
        args.time_limit.to_string().into(),
        "--mem".into(),
        args.mem.to_string().into(),
        "--run-dir".into(),
        run_dir.clone().into(),
        "-o".into(),
        recording.into(),
    ];
    if let Some(append) = &args.append {
        words.extend(["--append".into(), append.into()]);
    }
    if m32 {
        words.push("--m32".into());
    }
    if args.quiet {
        words.push("--quiet".into());
    }
    let code = super::record::run_words(&words)?;
    let summary_path = run_dir.join("summary.json");
    let text = std::fs::read_to_string(&summary_path).with_context(|| {
        format!(
            "the run (exit status {code}) left no summary at {}",
            summary_path.display()
        )
    })?;
    let summary: super::run::RunSummary = serde_json::from_str(&text)
        .with_context(|| format!("cannot parse {}", summary_path.display()))?;
    Ok(((run_dir, summary), false))
}

fn print_verdict(verdict: &Verdict, path: &Path, started: Instant) {
    println!();
    if let Some(title) = verdict.bug_title {
        println!("rrr: bug: {title}");
    }
    match (verdict.crashed, &verdict.crash_title) {
        (Some(true), Some(seen)) => {
            println!("rrr: the kernel crashed: {seen}");
            match verdict.title_match {
                Some(TitleMatch::Same) => println!("rrr: the crash is the bug (same title)"),
                Some(TitleMatch::Similar) => {
                    println!("rrr: the crash is a close variant of the bug (another access kind)")
                }
                Some(TitleMatch::Different) => {
                    println!("rrr: the crash is NOT the bug's (the titles differ)")
                }
                None => {}
            }
        }
        (Some(false), _) => println!("rrr: the kernel did not crash within the time limit"),
        _ => {}
    }
    for t in verdict.stages {
        println!(
            "rrr: stage {:<13} {:>7.1} s{}",
            t.stage.name(),
            t.secs,
            if t.cached { "  (cached)" } else { "" }
        );
    }
    println!(
        "rrr: total {:.1} s; verdict in {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    if let Some(recording) = &verdict.recording {
        println!(
            "rrr: the recording is {}; replay it with `rrr replay {}`",
            recording.display(),
            recording.display()
        );
    }
    if let Some(trace) = &verdict.trace {
        println!(
            "rrr: the trace is {}; open it with `rrr serve {}`, then {}",
            trace.display(),
            trace.display(),
            rrr_perfetto::ui_link(
                rrr_perfetto::DEFAULT_PORT,
                &trace.file_name().unwrap_or_default().to_string_lossy()
            )
        );
    }
}

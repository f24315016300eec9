//! Kernel builds for rrr: the guest kernel it records and the carrier kernel it runs in.
//!
//! A build is `tinyconfig` (or a full `--config`) merged with rrr's fragments and the caller's,
//! configured out of tree with `olddefconfig`, checked (every option a fragment asked for must
//! survive Kconfig), then built with `make vmlinux bzImage`. Results are cached by content:
//! see [`store`] for the layout and why a cache hit never runs Kconfig.

pub mod config;
mod error;
pub mod fragments;
pub mod gdb_scripts;
mod make;
pub mod patches;
pub mod source;
pub mod store;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub use error::KernelError;
use source::ResolvedSource;
use store::{Inputs, Store};

/// Which kernel: the one rrr records, or the one its carrier VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Single CPU, no kvm-clock, DWARF5 and `__fentry__` sites for tracing.
    Guest,
    /// SMP, KVM with AMD-V, virtio-pci and 9p, no debug info.
    Carrier,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Guest => "guest",
            Flavor::Carrier => "carrier",
        }
    }
}

/// A stage of a kernel build, as progress reports name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for another process that builds the same kernel.
    Wait,
    /// Unpacking the Debian source tarball (once per source version).
    Extract,
    /// Copying the source and applying rrr's guest patches (once per source version).
    Patch,
    /// `tinyconfig` (or the base config), the fragments, `olddefconfig` and the check.
    Configure,
    /// Compiling the kernel's objects.
    Compile,
    /// Linking `vmlinux` (kallsyms passes included) and making the bzImage.
    Link,
    /// Checking that the guest kernel's DWARF, which the tracer reads, is there.
    Dwarf,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Wait => "wait for another rrr building it",
            Stage::Extract => "extract source",
            Stage::Patch => "patch source",
            Stage::Configure => "config",
            Stage::Compile => "compile",
            Stage::Link => "link",
            Stage::Dwarf => "DWARF",
        }
    }
}

/// What a build reports while it works.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A new stage begins (the previous one is over).
    Stage(Stage),
    /// A step within the stage, e.g. `CC kernel/fork.o`.
    Step(&'a str),
}

/// Where the kernel source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Debian's `linux-source-6.12` tarball, extracted once under the cache.
    Debian,
    /// An existing source tree (never written to: builds are out of tree).
    Tree(PathBuf),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub source: Source,
    /// A full config to start from instead of `tinyconfig` (e.g. syzbot's).
    pub base_config: Option<PathBuf>,
    /// Extra fragments, merged after rrr's own.
    pub fragments: Vec<PathBuf>,
    pub flavor: Flavor,
    /// The compilers: gcc, or clang with LLVM's binutils for a config made by clang.
    pub toolchain: Toolchain,
}

/// Which compiler builds the kernel. Part of every cache key (through its version line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Toolchain {
    #[default]
    Gcc,
    /// `make LLVM=1`: clang, ld.lld and LLVM's binutils.
    Llvm,
}

impl Toolchain {
    fn make_args(self) -> &'static [&'static str] {
        match self {
            Toolchain::Gcc => &[],
            Toolchain::Llvm => &["LLVM=1"],
        }
    }
}

impl Default for KernelSpec {
    fn default() -> Self {
        KernelSpec {
            source: Source::Debian,
            base_config: None,
            fragments: Vec::new(),
            flavor: Flavor::Guest,
            toolchain: Toolchain::Gcc,
        }
    }
}

impl KernelSpec {
    /// The default carrier kernel.
    pub fn carrier() -> Self {
        KernelSpec {
            flavor: Flavor::Carrier,
            ..KernelSpec::default()
        }
    }
}

/// A complete build in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuild {
    pub dir: PathBuf,
}

impl KernelBuild {
    /// The uncompressed ELF kernel (with DWARF for the guest flavor).
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    pub fn bz_image(&self) -> PathBuf {
        self.dir.join("bzImage")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join(".config")
    }
    pub fn build_log(&self) -> PathBuf {
        self.dir.join("build.log")
    }
}

/// The caller's inputs, read and resolved: everything the inputs hash covers.
struct Prepared {
    source: ResolvedSource,
    base_config: Option<Vec<u8>>,
    fragments: Vec<Vec<u8>>,
    compiler: String,
    toolchain: Toolchain,
}

impl Prepared {
    fn inputs(&self, flavor: Flavor) -> Inputs<'_> {
        Inputs {
            flavor: flavor.name(),
            source_identity: &self.source.identity,
            base_config: self.base_config.as_deref(),
            fragments: &self.fragments,
            compiler: &self.compiler,
        }
    }
}

/// Whether the build gets rrr's patches (`patches`: the progress counter, no TSC): every guest
/// kernel, never the carrier, which runs on real (nested) AMD-V and is not recorded.
fn has_progress_counter(spec: &KernelSpec) -> bool {
    spec.flavor == Flavor::Guest
}

/// rrr's own fragments for a flavor, before the caller's.
fn own_fragments(spec: &KernelSpec) -> Vec<&'static str> {
    match (spec.flavor, &spec.base_config) {
        (Flavor::Guest, None) => vec![fragments::GUEST, fragments::REQUIRED],
        (Flavor::Guest, Some(_)) => vec![fragments::REQUIRED],
        (Flavor::Carrier, _) => vec![fragments::CARRIER],
    }
}

fn prepare(spec: &KernelSpec, source: ResolvedSource) -> Result<Prepared, KernelError> {
    let base_config = spec
        .base_config
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| KernelError::BaseConfig {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    let mut fragments: Vec<Vec<u8>> = own_fragments(spec)
        .into_iter()
        .map(|f| f.as_bytes().to_vec())
        .collect();
    for path in &spec.fragments {
        let text = std::fs::read(path).map_err(|source| KernelError::Fragment {
            path: path.clone(),
            source,
        })?;
        fragments.push(text);
    }
    Ok(Prepared {
        source,
        base_config,
        fragments,
        compiler: source::compiler_version(spec.toolchain)?,
        toolchain: spec.toolchain,
    })
}

/// The cached build for `spec`, if there is one, without extracting, configuring or building.
pub fn cached(spec: &KernelSpec, cache_dir: &Path) -> Result<Option<KernelBuild>, KernelError> {
    let source = match &spec.source {
        Source::Debian => {
            if !source::debian_tarball().is_file() {
                return Ok(None);
            }
            ResolvedSource {
                dir: PathBuf::new(),
                identity: format!(
                    "debian:{}={}",
                    source::DEBIAN_PACKAGE,
                    source::debian_version()?
                ),
            }
        }
        Source::Tree(_) => source::resolve(&spec.source, cache_dir, &|_| {})?,
    };
    let source = if has_progress_counter(spec) {
        ResolvedSource {
            identity: patches::patched_identity(&source.identity),
            ..source
        }
    } else {
        source
    };
    let prepared = prepare(spec, source)?;
    let hash = prepared.inputs(spec.flavor).hash();
    Ok(Store::new(cache_dir)
        .lookup(&hash)
        .map(|dir| KernelBuild { dir }))
}

/// Builds the kernel `spec` describes, or returns the cached build. `progress` hears of each
/// stage and step, on the calling thread.
pub fn build(
    spec: &KernelSpec,
    cache_dir: &Path,
    progress: &dyn Fn(Progress),
) -> Result<KernelBuild, KernelError> {
    if let Some(hit) = cached(spec, cache_dir)? {
        tracing::info!(dir = %hit.dir.display(), "kernel cache hit");
        return Ok(hit);
    }
    let mut source = source::resolve(&spec.source, cache_dir, progress)?;
    if has_progress_counter(spec) {
        source = patches::patched_source(&source, cache_dir, progress)?;
    }
    let prepared = prepare(spec, source)?;
    let inputs_hash = prepared.inputs(spec.flavor).hash();
    let store = Store::new(cache_dir);

    progress(Progress::Stage(Stage::Configure));
    let staging = store.staging_dir()?;
    let configured = configure(&prepared, &staging);
    let final_config = match configured {
        Ok(text) => text,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let key = store::build_key(&prepared.source.identity, &final_config, &prepared.compiler);
    tracing::info!(%key, flavor = spec.flavor.name(), "kernel configured");

    let entry = store.entry(&key);
    if entry.join("vmlinux").is_file() {
        let _ = std::fs::remove_dir_all(&staging);
        store.remember(&inputs_hash, &key)?;
        return Ok(KernelBuild { dir: entry });
    }

    let objects = objects_key(spec, &prepared, &key, &final_config);
    let _lock = store.lock(&objects, &|| progress(Progress::Stage(Stage::Wait)))?;
    if entry.join("vmlinux").is_file() {
        // Built by another process while we waited for the lock.
        let _ = std::fs::remove_dir_all(&staging);
        store.remember(&inputs_hash, &key)?;
        return Ok(KernelBuild { dir: entry });
    }
    let obj = adopt_obj_dir(&store, &objects, &staging)?;
    let started = Instant::now();
    compile(&prepared.source.dir, &obj, prepared.toolchain, progress)?;
    if spec.flavor == Flavor::Guest {
        progress(Progress::Stage(Stage::Dwarf));
        check_dwarf(&obj.join("vmlinux"))?;
    }
    let seconds = started.elapsed().as_secs();
    tracing::info!(seconds, "kernel built");

    let meta = serde_json::json!({
        "key": key,
        "flavor": spec.flavor.name(),
        "source": prepared.source.identity,
        "source_dir": prepared.source.dir,
        "obj_dir": obj,
        "compiler": prepared.compiler,
        "inputs": inputs_hash,
        "build_seconds": seconds,
    });
    let bz_image = obj.join("arch/x86/boot/bzImage");
    let dir = store.install(
        &key,
        &[
            ("vmlinux", &obj.join("vmlinux")),
            ("bzImage", &bz_image),
            (".config", &obj.join(".config")),
            ("build.log", &obj.join("build.log")),
        ],
        &serde_json::to_string_pretty(&meta).expect("json value serializes"),
    )?;
    store.remember(&inputs_hash, &key)?;
    Ok(KernelBuild { dir })
}

/// Which object directory (`make O=`) a build runs in. A local tree's contents change with every
/// edit, and so does its key; its objects are kept per tree path and config instead, so the
/// build after an edit is an incremental `make` that recompiles only what changed (make follows
/// the files' times, as the key does). A fixed source (Debian's) has one object directory per key.
fn objects_key(spec: &KernelSpec, prepared: &Prepared, key: &str, final_config: &str) -> String {
    match spec.source {
        Source::Debian => key.to_owned(),
        Source::Tree(_) => store::build_key(
            &format!("objects-of-tree:{}", prepared.source.dir.display()),
            final_config,
            &prepared.compiler,
        ),
    }
}

/// Runs Kconfig in `dir` (a `make O=` directory) and returns the checked final `.config` text.
fn configure(prepared: &Prepared, dir: &Path) -> Result<String, KernelError> {
    let src = &prepared.source.dir;
    let log = dir.join("build.log");
    let base = dir.join("rrr-base.config");
    match &prepared.base_config {
        None => {
            make(src, dir, prepared.toolchain, &["tinyconfig"], &log, &|_| {})?;
            std::fs::rename(dir.join(".config"), &base).map_err(KernelError::io(&base))?;
        }
        Some(text) => std::fs::write(&base, text).map_err(KernelError::io(&base))?,
    }
    let mut merge = Command::new("sh");
    merge
        .arg(src.join("scripts/kconfig/merge_config.sh"))
        .args(["-m", "-O"])
        .arg(dir)
        .arg(&base)
        .current_dir(dir);
    let mut wanted_text = String::new();
    for (i, fragment) in prepared.fragments.iter().enumerate() {
        let path = dir.join(format!("rrr-fragment-{i}.config"));
        std::fs::write(&path, fragment).map_err(KernelError::io(&path))?;
        merge.arg(&path);
        wanted_text.push_str(&String::from_utf8_lossy(fragment));
        wanted_text.push('\n');
    }
    check_status(&mut merge, &log, "merge_config.sh")?;
    make(
        src,
        dir,
        prepared.toolchain,
        &["olddefconfig"],
        &log,
        &|_| {},
    )?;

    let config_path = dir.join(".config");
    let final_text =
        std::fs::read_to_string(&config_path).map_err(KernelError::io(&config_path))?;
    let dropped = config::dropped(&config::parse(&wanted_text), &config::parse(&final_text));
    if !dropped.is_empty() {
        return Err(KernelError::OptionsDropped {
            report: config::report(&dropped, Some(src)),
        });
    }
    Ok(final_text)
}

/// Makes the staging directory the key's object directory, or, when one exists from an earlier
/// build, reuses it (its objects make the build incremental) with the new `.config`.
fn adopt_obj_dir(store: &Store, key: &str, staging: &Path) -> Result<PathBuf, KernelError> {
    let obj = store.obj_dir(key);
    if obj.join(".config").is_file() {
        let _ = std::fs::remove_dir_all(staging);
    } else {
        if obj.exists() {
            std::fs::remove_dir_all(&obj).map_err(KernelError::io(&obj))?;
        }
        std::fs::rename(staging, &obj).map_err(KernelError::io(&obj))?;
    }
    Ok(obj)
}

/// `make vmlinux bzImage` with a fresh build log; failures carry the compiler's error lines.
fn compile(
    src: &Path,
    obj: &Path,
    toolchain: Toolchain,
    progress: &dyn Fn(Progress),
) -> Result<(), KernelError> {
    let log = obj.join("build.log");
    let _ = std::fs::remove_file(&log);
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = format!("-j{jobs}");
    progress(Progress::Stage(Stage::Compile));
    let linking = std::cell::Cell::new(false);
    make(
        src,
        obj,
        toolchain,
        &[&jobs, "vmlinux", "bzImage"],
        &log,
        &|line| {
            if !linking.get() && make::starts_link(line) {
                linking.set(true);
                progress(Progress::Stage(Stage::Link));
            }
            if let Some(step) = make::step_of(line) {
                progress(Progress::Step(&step));
            }
        },
    )
}

/// The guest kernel must carry DWARF for the tracer: Kconfig kept the option (checked before
/// the build), and this checks the linked result, reading only the ELF headers.
fn check_dwarf(vmlinux: &Path) -> Result<(), KernelError> {
    use object::{Object, ObjectSection};
    let no_dwarf = |detail: String| KernelError::NoDwarf {
        vmlinux: vmlinux.to_owned(),
        detail,
    };
    let file = std::fs::File::open(vmlinux).map_err(KernelError::io(vmlinux))?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|err| no_dwarf(format!(" ({err})")))?;
    match elf.section_by_name(".debug_info").map(|s| s.size()) {
        Some(size) if size > 0 => {
            tracing::info!(bytes = size, "the kernel's DWARF is there");
            Ok(())
        }
        _ => Err(no_dwarf(String::new())),
    }
}

fn make(
    src: &Path,
    obj: &Path,
    toolchain: Toolchain,
    targets: &[&str],
    log: &Path,
    on_line: &dyn Fn(&str),
) -> Result<(), KernelError> {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg(format!("O={}", obj.display()))
        .args(toolchain.make_args())
        .args(targets)
        // Kbuild reads these from the environment; a caller's setting must not leak in.
        .env_remove("KCONFIG_CONFIG")
        .env_remove("ARCH")
        .env_remove("CROSS_COMPILE");
    match make::run_logged(&mut cmd, log, on_line)? {
        Ok(()) => Ok(()),
        Err(_status) => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            Err(KernelError::BuildFailed {
                log: log.to_path_buf(),
                errors: make::error_excerpt(&text, 40),
            })
        }
    }
}

fn check_status(cmd: &mut Command, log: &Path, what: &str) -> Result<(), KernelError> {
    match make::run_logged(cmd, log, &|_| {})? {
        Ok(()) => Ok(()),
        Err(status) => Err(KernelError::Command {
            command: what.to_owned(),
            status,
            detail: format!("; log: {}", log.display()),
        }),
    }
}

//! Root filesystem images for rrr: the stimulus compiled like a syzkaller reproducer, the guest
//! agent as PID 1, busybox, in an ext4 filesystem inside a qcow2 image.
//!
//! [`build`] caches by content under `<cache>/rootfs/<key>.qcow2`: the same stimulus, flags,
//! agent, busybox and compiler give the same key, and the same bytes.

mod busybox;
mod compile;
mod error;
mod image;
mod key;
mod tool;
pub mod traps;
mod tree;

use std::path::{Path, PathBuf};

use sha2::Digest;

pub use compile::STIMULUS_SOURCE_DIR;
pub use error::RootfsError;
pub use key::BUILDER_VERSION;

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct RootfsSpec {
    /// The stimulus, a C source file; it becomes `/stimulus`.
    pub stimulus: PathBuf,
    /// Build the stimulus as 32-bit x86 (needs gcc-multilib, and IA32 emulation in the kernel).
    pub m32: bool,
    /// Appended to gcc's command line for the stimulus.
    pub extra_cflags: Vec<String>,
}

impl RootfsSpec {
    pub fn new(stimulus: impl Into<PathBuf>) -> Self {
        RootfsSpec {
            stimulus: stimulus.into(),
            m32: false,
            extra_cflags: Vec::new(),
        }
    }
}

/// A built image in the cache.
#[derive(Debug, Clone)]
pub struct RootfsImage {
    /// The qcow2 image.
    pub path: PathBuf,
    /// The compiled stimulus, with symbols (the same bytes as `/stimulus` in the image).
    pub stimulus_binary: PathBuf,
    /// The content hash naming both files.
    pub key: String,
    /// True when the image was already in the cache.
    pub cached: bool,
    /// What the stimulus's scan for time and entropy instructions found and rewrote, when it was
    /// compiled now (`None` from the cache, and for the base image).
    pub traps: Option<traps::TrapReport>,
}

/// Builds (or finds in the cache) the image for `spec` under `cache_dir/rootfs/`.
pub fn build(spec: &RootfsSpec, cache_dir: &Path) -> Result<RootfsImage, RootfsError> {
    let (source, stimulus_name) = read_stimulus(spec)?;
    let busybox_path = Path::new(busybox::DEFAULT_BUSYBOX);
    let busybox_bytes = busybox::load(busybox_path)?;
    let compiler = compiler_version()?;
    let key = key::cache_key(&key::KeyInputs {
        stimulus_name: &stimulus_name,
        stimulus_source: &source,
        m32: spec.m32,
        extra_cflags: &spec.extra_cflags,
        compiler: &compiler,
        busybox: &busybox_bytes,
    });

    let dir = cache_dir.join("rootfs");
    let image = RootfsImage {
        path: dir.join(format!("{key}.qcow2")),
        stimulus_binary: dir.join(format!("{key}.stimulus")),
        key,
        cached: true,
        traps: None,
    };
    if image.path.is_file() && image.stimulus_binary.is_file() {
        tracing::info!(image = %image.path.display(), "rootfs image found in the cache");
        return Ok(image);
    }
    std::fs::create_dir_all(&dir)
        .map_err(RootfsError::io(format!("cannot create {}", dir.display())))?;

    // Built in a scratch directory beside the final place, then renamed: a crash or a parallel
    // build never leaves a half-written image under the final name.
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&dir)
        .map_err(RootfsError::io(format!(
            "cannot create a build directory in {}",
            dir.display()
        )))?;
    let work = work.path();
    let stimulus_bin = work.join("stimulus");
    let traps = compile::compile_stimulus(
        &compile::StimulusBuild {
            source: &spec.stimulus,
            m32: spec.m32,
            extra_cflags: &spec.extra_cflags,
            seed: &image.key,
        },
        work,
        &stimulus_bin,
    )?;
    let agent_bin = work.join("agent");
    compile::compile_agent(work, &agent_bin)?;

    let tree = work.join("tree");
    std::fs::create_dir(&tree).map_err(RootfsError::io("cannot create the rootfs tree"))?;
    let applets = busybox::applets(busybox_path)?;
    let paths = tree::assemble(
        &tree,
        &tree::TreeInputs {
            agent: &agent_bin,
            stimulus: Some(&stimulus_bin),
            busybox: &busybox_bytes,
            applets: &applets,
        },
    )?;

    let content = file_bytes(&[&agent_bin, &stimulus_bin])? + busybox_bytes.len() as u64;
    let size = image::size_mib(content);
    let raw = work.join("rootfs.ext4");
    image::make_ext4(&tree, &paths, &raw, size, work)?;
    let qcow2 = work.join("rootfs.qcow2");
    image::to_qcow2(&raw, &qcow2)?;

    rename(&stimulus_bin, &image.stimulus_binary)?;
    rename(&qcow2, &image.path)?;
    tracing::info!(image = %image.path.display(), size_mib = size, "rootfs image built");
    Ok(RootfsImage {
        cached: false,
        traps: Some(traps),
        ..image
    })
}

/// The base image: the agent and busybox, no stimulus (it comes on the stimulus disk). One per
/// machine setup, so one snapshot per kernel serves every stimulus. Cached under
/// `cache_dir/rootfs/base-<key>.qcow2`.
pub fn build_base(cache_dir: &Path) -> Result<RootfsImage, RootfsError> {
    let busybox_path = Path::new(busybox::DEFAULT_BUSYBOX);
    let busybox_bytes = busybox::load(busybox_path)?;
    let compiler = compiler_version()?;
    let key = key::base_key(&compiler, &busybox_bytes);
    let dir = cache_dir.join("rootfs");
    let path = dir.join(format!("base-{key}.qcow2"));
    let image = RootfsImage {
        stimulus_binary: PathBuf::new(),
        path,
        key,
        cached: true,
        traps: None,
    };
    if image.path.is_file() {
        return Ok(image);
    }
    std::fs::create_dir_all(&dir)
        .map_err(RootfsError::io(format!("cannot create {}", dir.display())))?;
    let work = scratch_dir(&dir)?;
    let work = work.path();
    let agent_bin = work.join("agent");
    compile::compile_agent(work, &agent_bin)?;
    let tree = work.join("tree");
    std::fs::create_dir(&tree).map_err(RootfsError::io("cannot create the rootfs tree"))?;
    let applets = busybox::applets(busybox_path)?;
    let paths = tree::assemble(
        &tree,
        &tree::TreeInputs {
            agent: &agent_bin,
            stimulus: None,
            busybox: &busybox_bytes,
            applets: &applets,
        },
    )?;
    let content = file_bytes(&[&agent_bin])? + busybox_bytes.len() as u64;
    let size = image::size_mib(content);
    let raw = work.join("rootfs.ext4");
    image::make_ext4(&tree, &paths, &raw, size, work)?;
    let qcow2 = work.join("rootfs.qcow2");
    image::to_qcow2(&raw, &qcow2)?;
    rename(&qcow2, &image.path)?;
    tracing::info!(image = %image.path.display(), size_mib = size, "base rootfs image built");
    Ok(RootfsImage {
        cached: false,
        ..image
    })
}

/// A stimulus compiled on its own, for the stimulus disk.
#[derive(Debug, Clone)]
pub struct StimulusBinary {
    /// The static executable, with symbols.
    pub path: PathBuf,
    pub key: String,
    pub cached: bool,
    /// What the scan for time and entropy instructions found and rewrote, when it was compiled
    /// now (`None` from the cache).
    pub traps: Option<traps::TrapReport>,
}

/// Compiles (or finds in the cache) the stimulus of `spec`, under
/// `cache_dir/stimuli/<key>`.
pub fn build_stimulus(spec: &RootfsSpec, cache_dir: &Path) -> Result<StimulusBinary, RootfsError> {
    let (source, stimulus_name) = read_stimulus(spec)?;
    let compiler = compiler_version()?;
    let key = key::stimulus_key(&key::KeyInputs {
        stimulus_name: &stimulus_name,
        stimulus_source: &source,
        m32: spec.m32,
        extra_cflags: &spec.extra_cflags,
        compiler: &compiler,
        busybox: &[],
    });
    let dir = cache_dir.join("stimuli");
    let binary = StimulusBinary {
        path: dir.join(&key),
        key,
        cached: true,
        traps: None,
    };
    if binary.path.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir)
        .map_err(RootfsError::io(format!("cannot create {}", dir.display())))?;
    let work = scratch_dir(&dir)?;
    let out = work.path().join("stimulus");
    let traps = compile::compile_stimulus(
        &compile::StimulusBuild {
            source: &spec.stimulus,
            m32: spec.m32,
            extra_cflags: &spec.extra_cflags,
            seed: &binary.key,
        },
        work.path(),
        &out,
    )?;
    rename(&out, &binary.path)?;
    Ok(StimulusBinary {
        cached: false,
        traps: Some(traps),
        ..binary
    })
}

/// A scratch directory beside the final place: a crash or a parallel build never leaves a
/// half-written file under a final name.
fn scratch_dir(dir: &Path) -> Result<tempfile::TempDir, RootfsError> {
    tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(dir)
        .map_err(RootfsError::io(format!(
            "cannot create a build directory in {}",
            dir.display()
        )))
}

/// The stimulus's source and file name; it must be a readable `.c` file.
fn read_stimulus(spec: &RootfsSpec) -> Result<(Vec<u8>, String), RootfsError> {
    let source =
        std::fs::read(&spec.stimulus).map_err(|error| RootfsError::StimulusUnreadable {
            path: spec.stimulus.clone(),
            error,
        })?;
    let name = spec
        .stimulus
        .file_name()
        .filter(|_| spec.stimulus.extension().is_some_and(|ext| ext == "c"))
        .ok_or_else(|| RootfsError::StimulusNotC {
            path: spec.stimulus.clone(),
        })?
        .to_string_lossy()
        .into_owned();
    Ok((source, name))
}

/// gcc's version is part of the key: a new compiler makes a different stimulus binary.
fn compiler_version() -> Result<String, RootfsError> {
    let output = tool::GCC.run(tool::GCC.command().arg("--version"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(hex::encode(sha2::Sha256::digest(text.as_bytes())))
}

fn file_bytes(paths: &[&Path]) -> Result<u64, RootfsError> {
    paths.iter().try_fold(0, |sum, path| {
        let meta = std::fs::metadata(path)
            .map_err(RootfsError::io(format!("cannot stat {}", path.display())))?;
        Ok(sum + meta.len())
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), RootfsError> {
    std::fs::rename(from, to).map_err(RootfsError::io(format!(
        "cannot move the image into place at {}",
        to.display()
    )))
}

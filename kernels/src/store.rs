//! The kernel cache: `<cache>/kernels/<key>/` entries, the index that finds them without running
//! Kconfig, per-key object directories, and the lock that serializes builds of one key.
//!
//! Layout:
//! - `kernels/<key>/`: a complete build (`vmlinux`, `bzImage`, `.config`, `build.log`,
//!   `build.json`), only ever created by renaming a finished temporary directory.
//! - `kernels/index/<inputs-hash>`: the key that those inputs produced last time.
//! - `kernels/obj/<key>/`: the `make O=` directory, kept for incremental rebuilds.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::KernelError;

/// Bumped when the layout or the meaning of a key changes, so old entries are not reused.
const FORMAT: &str = "rrr-kernels-v1";

/// A name no other process (or thread) will choose at the same time.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// Hashes length-prefixed parts, so no two different part lists collide by concatenation.
fn hash_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(FORMAT.as_bytes());
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Everything that decides the final `.config`, before Kconfig runs.
pub struct Inputs<'a> {
    pub flavor: &'a str,
    pub source_identity: &'a str,
    /// `None` means `make tinyconfig`.
    pub base_config: Option<&'a [u8]>,
    /// Contents of every fragment, in merge order.
    pub fragments: &'a [Vec<u8>],
    pub compiler: &'a str,
}

impl Inputs<'_> {
    pub fn hash(&self) -> String {
        let base: &[u8] = self.base_config.unwrap_or(b"\0tinyconfig");
        let mut parts: Vec<&[u8]> = vec![
            self.flavor.as_bytes(),
            self.source_identity.as_bytes(),
            base,
            self.compiler.as_bytes(),
        ];
        parts.extend(self.fragments.iter().map(Vec::as_slice));
        hash_parts(parts)
    }
}

/// The cache key of a build: the source, the final `.config` and the compiler.
pub fn build_key(source_identity: &str, final_config: &str, compiler: &str) -> String {
    hash_parts([
        source_identity.as_bytes(),
        final_config.as_bytes(),
        compiler.as_bytes(),
    ])
}

/// The kernel cache rooted at `<cache>/kernels`.
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(cache_dir: &Path) -> Self {
        Store {
            root: cache_dir.join("kernels"),
        }
    }

    /// The store whose root (`CACHE/kernels`) is `root`.
    pub fn at(root: &Path) -> Self {
        Store {
            root: root.to_owned(),
        }
    }

    pub fn entry(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn obj_dir(&self, key: &str) -> PathBuf {
        self.root.join("obj").join(key)
    }

    /// A fresh directory for running Kconfig before the key is known.
    pub fn staging_dir(&self) -> Result<PathBuf, KernelError> {
        let dir = self
            .root
            .join("obj")
            .join(format!(".config-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).map_err(KernelError::io(&dir))?;
        Ok(dir)
    }

    /// The complete entry the index maps these inputs to, if there is one.
    pub fn lookup(&self, inputs_hash: &str) -> Option<PathBuf> {
        let key = std::fs::read_to_string(self.index_path(inputs_hash)).ok()?;
        let key = key.trim();
        let valid = key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit());
        let entry = self.entry(key);
        (valid && entry.join("vmlinux").is_file()).then_some(entry)
    }

    /// Records that these inputs produce `key` (written atomically: temp file, then rename).
    pub fn remember(&self, inputs_hash: &str, key: &str) -> Result<(), KernelError> {
        let path = self.index_path(inputs_hash);
        let dir = path.parent().expect("index path has a parent");
        std::fs::create_dir_all(dir).map_err(KernelError::io(dir))?;
        let tmp = dir.join(format!(".tmp-{}", unique_suffix()));
        std::fs::write(&tmp, format!("{key}\n")).map_err(KernelError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(KernelError::io(&path))
    }

    fn index_path(&self, inputs_hash: &str) -> PathBuf {
        self.root.join("index").join(inputs_hash)
    }

    /// Holds an exclusive lock on one key while it is built, so two processes asking for the same
    /// kernel do not run `make` in the same object directory. `on_wait` is called first if
    /// another process holds it (its build can take minutes).
    pub fn lock(&self, key: &str, on_wait: &dyn Fn()) -> Result<KeyLock, KernelError> {
        let path = self.root.join("obj").join(format!("{key}.lock"));
        std::fs::create_dir_all(self.root.join("obj")).map_err(KernelError::io(&path))?;
        let file = File::create(&path).map_err(KernelError::io(&path))?;
        // SAFETY: flock on a file descriptor we own; it is released when `file` is closed.
        let mut rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
            on_wait();
            // SAFETY: as above.
            rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        }
        if rc != 0 {
            return Err(KernelError::Io {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(KeyLock { _file: file })
    }

    /// Copies `files` (name in the entry, source path) into a temporary directory and renames it
    /// to the entry, so a killed build never leaves a complete-looking entry.
    pub fn install(
        &self,
        key: &str,
        files: &[(&str, &Path)],
        meta: &str,
    ) -> Result<PathBuf, KernelError> {
        let entry = self.entry(key);
        let tmp = self.root.join(format!(".tmp-{key}-{}", unique_suffix()));
        std::fs::create_dir_all(&tmp).map_err(KernelError::io(&tmp))?;
        let result = (|| {
            for (name, from) in files {
                let to = tmp.join(name);
                std::fs::copy(from, &to).map_err(KernelError::io(*from))?;
            }
            let meta_path = tmp.join("build.json");
            std::fs::write(&meta_path, meta).map_err(KernelError::io(&meta_path))?;
            match std::fs::rename(&tmp, &entry) {
                // Another process installed the same key first: identical inputs, keep theirs.
                Err(_) if entry.join("vmlinux").is_file() => Ok(()),
                other => other.map_err(KernelError::io(&entry)),
            }
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        result.map(|()| entry)
    }
}

/// An exclusive build lock on one key; released on drop.
pub struct KeyLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(identity: &'a str, frags: &'a [Vec<u8>], base: Option<&'a [u8]>) -> Inputs<'a> {
        Inputs {
            flavor: "guest",
            source_identity: identity,
            base_config: base,
            fragments: frags,
            compiler: "gcc (Debian 12.2.0-14) 12.2.0",
        }
    }

    #[test]
    fn inputs_hash_is_stable_and_sensitive_to_every_input() {
        let frags = vec![b"CONFIG_A=y\n".to_vec(), b"CONFIG_B=y\n".to_vec()];
        let base = inputs("debian:1", &frags, None).hash();
        assert_eq!(base, inputs("debian:1", &frags, None).hash());
        assert_eq!(base.len(), 64);

        assert_ne!(base, inputs("debian:2", &frags, None).hash());
        assert_ne!(
            base,
            inputs("debian:1", &frags, Some(b"CONFIG_X=y\n")).hash()
        );
        let reordered = vec![frags[1].clone(), frags[0].clone()];
        assert_ne!(base, inputs("debian:1", &reordered, None).hash());
        // Moving bytes between fragments must not produce the same hash.
        let shifted = vec![b"CONFIG_A=y\nCONFIG_B".to_vec(), b"=y\n".to_vec()];
        assert_ne!(base, inputs("debian:1", &shifted, None).hash());
        let mut carrier = inputs("debian:1", &frags, None);
        carrier.flavor = "carrier";
        assert_ne!(base, carrier.hash());
        let mut clang = inputs("debian:1", &frags, None);
        clang.compiler = "clang 16";
        assert_ne!(base, clang.hash());
    }

    #[test]
    fn build_key_is_stable_and_sensitive() {
        let key = build_key("debian:1", "CONFIG_A=y\n", "gcc 12");
        assert_eq!(key, build_key("debian:1", "CONFIG_A=y\n", "gcc 12"));
        assert_ne!(key, build_key("debian:1", "CONFIG_A=m\n", "gcc 12"));
        assert_ne!(key, build_key("debian:2", "CONFIG_A=y\n", "gcc 12"));
        assert_ne!(key, build_key("debian:1", "CONFIG_A=y\n", "gcc 13"));
    }

    #[test]
    fn index_finds_only_installed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let key = build_key("s", "c", "g");
        store.remember("inputs", &key).unwrap();
        assert_eq!(store.lookup("inputs"), None, "entry not installed yet");

        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let entry = store
            .install(&key, &[("vmlinux", &file), ("bzImage", &file)], "{}")
            .unwrap();
        assert_eq!(store.lookup("inputs"), Some(entry.clone()));
        assert!(entry.join("build.json").is_file());
        assert_eq!(store.lookup("other"), None);

        // Installing the same key again (a concurrent build) keeps the first entry.
        store.install(&key, &[("vmlinux", &file)], "{}").unwrap();
        assert!(entry.join("bzImage").is_file());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("kernels"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_corrupt_index_entry_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.remember("inputs", "../../etc").unwrap();
        assert_eq!(store.lookup("inputs"), None);
    }

    #[test]
    fn a_held_lock_is_waited_for_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let quiet = || panic!("nobody else holds the lock");
        let held = store.lock("k", &quiet).unwrap();
        let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        let waiter = std::thread::spawn(move || {
            let said = std::cell::Cell::new(false);
            let lock = Store::new(&path).lock("k", &|| {
                said.set(true);
                waiting_tx.send(()).unwrap();
            });
            (lock.is_ok(), said.get())
        });
        waiting_rx.recv().unwrap();
        drop(held);
        assert_eq!(waiter.join().unwrap(), (true, true));
        drop(store.lock("other", &quiet).unwrap());
    }
}

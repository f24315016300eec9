//! SHA-256 of large files (a `vmlinux` with DWARF is hundreds of MiB), computed once and
//! remembered under the cache by the file's path, size, inode and modification time: a snapshot
//! is identified by the digests of its kernel and rootfs, and restoring must not hash them
//! every time (inside the carrier, hashing runs under emulation).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// The hex SHA-256 of `path`'s contents.
pub fn file_sha256(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let stamp = format!(
        "{}\0{}\0{}\0{}",
        absolute.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let memo = crate::cache::cache_dir()?
        .join("digests")
        .join(hex::encode(Sha256::digest(stamp.as_bytes())));
    if let Ok(known) = std::fs::read_to_string(&memo) {
        if known.len() == 64 && known.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(known);
        }
    }
    let digest = hash_file(path)?;
    if let Some(dir) = memo.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // Best effort: a memo that cannot be written only costs a rehash next time.
    let tmp = memo.with_extension(format!("tmp.{}", std::process::id()));
    if std::fs::write(&tmp, &digest).is_ok() {
        let _ = std::fs::rename(&tmp, &memo);
    }
    Ok(digest)
}

fn hash_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("RRR_CACHE_DIR", dir.path().join("cache"));
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let first = file_sha256(&file).unwrap();
        assert_eq!(
            first,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(file_sha256(&file).unwrap(), first, "memoized");
        std::fs::write(&file, b"abd").unwrap();
        assert_ne!(
            file_sha256(&file).unwrap(),
            first,
            "a rewrite is a new digest"
        );
    }
}

//! Where rrr keeps what it builds: `$RRR_CACHE_DIR`, else `$XDG_CACHE_HOME/rrr`, else
//! `~/.cache/rrr`. Every expensive product lives under it, keyed by content.

use std::path::PathBuf;

use anyhow::{Context, Result};

pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os("RRR_CACHE_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(dir)
    } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(dir).join("rrr")
    } else {
        let home = std::env::var_os("HOME")
            .filter(|d| !d.is_empty())
            .context("cannot find a cache directory: set RRR_CACHE_DIR or HOME")?;
        PathBuf::from(home).join(".cache").join("rrr")
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    Ok(dir)
}

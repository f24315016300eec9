//! The tree becomes an ext4 filesystem (mke2fs -d), then a checked qcow2 image.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tool::{combined, DEBUGFS, MKE2FS, QEMU_IMG};
use crate::tree::FIXED_EPOCH;
use crate::RootfsError;

const MIB: u64 = 1 << 20;
/// Smallest image: room for what a reproducer writes (qcow2 stores only what is used).
const MIN_SIZE_MIB: u64 = 128;
/// Free space on top of twice the content.
const HEADROOM_MIB: u64 = 64;

/// Fixed identities so the same tree gives the same bytes (mke2fs would pick random ones).
const FS_UUID: &str = "2b7e1516-28ae-4d2a-a6d2-a6abf7158809";
const HASH_SEED: &str = "3243f6a8-885a-48d3-a313-198a2e037073";
const LABEL: &str = "rrr-root";

/// The feature set, pinned here rather than taken from the host's /etc/mke2fs.conf, so images do
/// not change with the host and stay mountable by older kernels (no orphan_file and the like).
const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// Image size for `content_bytes` of files.
pub fn size_mib(content_bytes: u64) -> u64 {
    (2 * content_bytes.div_ceil(MIB) + HEADROOM_MIB).max(MIN_SIZE_MIB)
}

/// Makes an ext4 image of `tree` at `raw`. `paths` (relative, from the tree walk) get owner
/// root:root, whoever runs the build, and the fixed timestamps.
pub fn make_ext4(
    tree: &Path,
    paths: &[PathBuf],
    raw: &Path,
    size_mib: u64,
    work: &Path,
) -> Result<(), RootfsError> {
    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF).map_err(RootfsError::io("cannot write mke2fs.conf"))?;
    // Created first so mke2fs does not announce "Creating regular file".
    std::fs::File::create(raw)
        .map_err(RootfsError::io(format!("cannot create {}", raw.display())))?;
    let mut mke2fs = e2fs_command(MKE2FS.command(), &conf);
    mke2fs
        .args(["-t", "ext4", "-F", "-q", "-L", LABEL, "-U", FS_UUID])
        .arg("-E")
        .arg(format!("root_owner=0:0,hash_seed={HASH_SEED}"))
        .arg("-d")
        .arg(tree)
        .arg(raw)
        .arg(format!("{size_mib}M"));
    MKE2FS.run(&mut mke2fs)?;
    normalize_inodes(paths, raw, work, &conf)
}

/// mke2fs -d copies owners and ctimes from the tree: owners belong to the building user unless
/// that is root, and a ctime cannot be set on the host, it is the moment the file was written.
/// debugfs sets both, so equal inputs give equal bytes whoever builds them and whenever.
fn normalize_inodes(
    paths: &[PathBuf],
    raw: &Path,
    work: &Path,
    conf: &Path,
) -> Result<(), RootfsError> {
    let mut script = String::new();
    let root = PathBuf::new();
    for path in std::iter::once(&root).chain(paths) {
        let path = path.display();
        for (field, value) in [
            ("uid", "0".to_string()),
            ("gid", "0".to_string()),
            ("ctime", format!("@{FIXED_EPOCH}")),
        ] {
            script.push_str(&format!("sif \"/{path}\" {field} {value}\n"));
        }
    }
    let script_path = work.join("normalize.debugfs");
    std::fs::write(&script_path, script).map_err(RootfsError::io("cannot write debugfs script"))?;
    let mut debugfs = e2fs_command(DEBUGFS.command(), conf);
    debugfs.arg("-w").arg("-f").arg(&script_path).arg(raw);
    let output = DEBUGFS.run(&mut debugfs)?;
    // debugfs exits 0 even when a command fails; its complaints go to stderr after the banner.
    let complaints: Vec<_> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| !line.starts_with("debugfs "))
        .map(str::to_owned)
        .collect();
    if !complaints.is_empty() {
        return Err(RootfsError::ToolFailed {
            command: crate::tool::describe(&debugfs),
            status: output.status,
            output: complaints.join("\n"),
        });
    }
    Ok(())
}

/// e2fsprogs stamps the superblock with the current time unless told otherwise.
fn e2fs_command(mut cmd: Command, conf: &Path) -> Command {
    cmd.env("E2FSPROGS_FAKE_TIME", FIXED_EPOCH.to_string())
        .env("MKE2FS_CONFIG", conf);
    cmd
}

/// Converts the raw image to qcow2 at `qcow2` and fails unless `qemu-img check` finds it clean.
pub fn to_qcow2(raw: &Path, qcow2: &Path) -> Result<(), RootfsError> {
    QEMU_IMG.run(
        QEMU_IMG
            .command()
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(qcow2),
    )?;
    check_qcow2(qcow2)
}

/// `qemu-img check` exits non-zero on corruption (2) or leaked clusters (3).
pub fn check_qcow2(qcow2: &Path) -> Result<(), RootfsError> {
    let output = QEMU_IMG.output(QEMU_IMG.command().args(["check", "-f", "qcow2"]).arg(qcow2))?;
    if !output.status.success() {
        return Err(RootfsError::ImageCheckFailed {
            path: qcow2.to_path_buf(),
            report: combined(&output),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_has_a_floor_and_grows_with_content() {
        assert_eq!(size_mib(0), MIN_SIZE_MIB);
        assert_eq!(size_mib(100 * MIB), 264);
        assert!(size_mib(40 * MIB) >= 2 * 40);
    }

    #[test]
    fn a_corrupt_qcow2_fails_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let qcow2 = dir.path().join("img.qcow2");
        to_qcow2(&raw, &qcow2).unwrap();
        // Point the first L1 entry at a cluster far past the end of the file.
        let mut bytes = std::fs::read(&qcow2).unwrap();
        let l1_offset = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        bytes[l1_offset..l1_offset + 8].copy_from_slice(&0x8000_0000_7fff_0000u64.to_be_bytes());
        std::fs::write(&qcow2, bytes).unwrap();
        let err = check_qcow2(&qcow2).unwrap_err();
        assert!(matches!(err, RootfsError::ImageCheckFailed { .. }), "{err}");
    }
}

//! Names what a file that is not a qcow2 image seems to be, so the error tells the user what
//! they passed (a raw ext4 image is the usual mistake) instead of only "bad magic".

/// How many leading bytes [`describe`] wants to see.
pub const SNIFF_LEN: usize = 2048;

/// `head` is the start of the file (shorter if the file is).
pub fn describe(head: &[u8]) -> String {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if head.is_empty() {
        return "an empty file".into();
    }
    if at(0, b"QFI\xfb") {
        return "a qcow image of an unknown version".into();
    }
    if at(1080, &[0x53, 0xef]) {
        return "a raw ext2/3/4 filesystem image (convert it with `qemu-img convert -O qcow2`)"
            .into();
    }
    let known: &[(usize, &[u8], &str)] = &[
        (0, b"\x7fELF", "an ELF executable"),
        (0, b"\x1f\x8b", "a gzip archive"),
        (0, b"\x28\xb5\x2f\xfd", "a zstd archive"),
        (0, b"\xfd7zXZ\x00", "an xz archive"),
        (0, b"KDMV", "a VMDK image"),
        (0, b"vhdxfile", "a VHDX image"),
        (0, b"conectix", "a VHD image"),
        (64, b"\x7f\x10\xda\xbe", "a VDI image"),
        (257, b"ustar", "a tar archive"),
        (0x202, b"HdrS", "a Linux bzImage kernel"),
        (510, b"\x55\xaa", "a raw disk image with a boot sector"),
    ];
    for (off, magic, what) in known {
        if at(*off, magic) {
            return (*what).into();
        }
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("unknown data (starts with {})", shown.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_common_mistakes() {
        let mut ext4 = vec![0u8; SNIFF_LEN];
        ext4[1080] = 0x53;
        ext4[1081] = 0xef;
        assert!(describe(&ext4).contains("ext2/3/4"));
        assert!(describe(b"\x7fELF\x02\x01").contains("ELF"));
        assert_eq!(describe(b""), "an empty file");
        assert_eq!(
            describe(b"hello"),
            "unknown data (starts with 68 65 6c 6c 6f)"
        );
    }
}

//! The hash of guest RAM at the end of a run, which a replay must reproduce.
//!
//! It covers every non-zero page, as (page number, CRC32) in page order. On a copy-on-write
//! mapping of the snapshot, only the pages the run wrote are read: the snapshot keeps the CRC of
//! each of its pages, and the kernel's page map tells which pages are still the snapshot's.
//! Reading all of RAM instead costs about 1.5 s inside the carrier, longer than many runs.

use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::Vmm;
use crate::persist::memory::PageCrcs;
use crate::vstate::memory::{written_pages_of_private_mapping, MemoryOrigin};

use super::fnv;

/// Where [`memory_hash`] lists the final state's pages, when set.
pub const STATE_PAGES_ENV: &str = "RRR_STATE_PAGES";

const PAGE: usize = 4096;

/// A hash of every non-zero page of guest RAM with its page number. With `RRR_STATE_PAGES` set
/// to a file path, the page numbers and CRCs are also written there, one `page crc` line each
/// (hex): two runs whose final hashes differ can then be compared page by page.
pub fn memory_hash(vmm: &Vmm) -> u64 {
    let pages = nonzero_page_crcs(vmm);
    if let Some(path) = std::env::var_os(STATE_PAGES_ENV) {
        if let Err(err) = write_page_crcs(Path::new(&path), &pages) {
            tracing::warn!("cannot write the final state's pages to {path:?}: {err}");
        }
    }
    fnv(pages.iter().flat_map(|&(page, crc)| [page, u64::from(crc)]))
}

/// Every non-zero page of guest RAM, by page number, with the CRC32 of its contents.
fn nonzero_page_crcs(vmm: &Vmm) -> PageCrcs {
    if let MemoryOrigin::SnapshotMapping(snapshot) = &vmm.mem_origin {
        match written_since_snapshot(vmm) {
            Ok(written) => return merge_written(snapshot, &written),
            // Not an error for the run: the slow way gives the same hash.
            Err(err) => tracing::debug!("page map unreadable ({err}); hashing all of RAM"),
        }
    }
    let mut pages = PageCrcs::new();
    for (base, bytes) in regions(vmm) {
        for (index, page) in bytes.chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                pages.push((base + index as u64, crc32fast::hash(page)));
            }
        }
    }
    pages
}

/// Each region's first page number and bytes.
fn regions(vmm: &Vmm) -> impl Iterator<Item = (u64, &[u8])> {
    vmm.mem.iter().map(|region| {
        // SAFETY: the region maps `len` bytes for as long as `vmm.mem` lives, and the vCPU is
        // stopped (the run is over), so nothing writes them while they are read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        (region.start_addr().0 / PAGE as u64, bytes)
    })
}

/// A region of guest RAM and which of its pages the run wrote.
struct WrittenRegion<'a> {
    /// Its first page number.
    base: u64,
    bytes: &'a [u8],
    written: Vec<bool>,
}

impl WrittenRegion<'_> {
    fn wrote(&self, page: u64) -> bool {
        page >= self.base
            && self
                .written
                .get((page - self.base) as usize)
                .copied()
                .unwrap_or(false)
    }
}

/// For each region, which of its pages were written since the snapshot was mapped.
fn written_since_snapshot(vmm: &Vmm) -> std::io::Result<Vec<WrittenRegion<'_>>> {
    regions(vmm)
        .map(|(base, bytes)| {
            let written = written_pages_of_private_mapping(bytes.as_ptr(), bytes.len() / PAGE)?;
            Ok(WrittenRegion {
                base,
                bytes,
                written,
            })
        })
        .collect()
}

/// The snapshot's page CRCs, with every written page's taken from its bytes now (and dropped
/// if it is zero now).
fn merge_written(snapshot: &PageCrcs, regions: &[WrittenRegion]) -> PageCrcs {
    let mut pages: PageCrcs = snapshot
        .iter()
        .copied()
        .filter(|&(page, _)| !regions.iter().any(|r| r.wrote(page)))
        .collect();
    let mut read = 0usize;
    for region in regions {
        for (index, _) in region.written.iter().enumerate().filter(|(_, &w)| w) {
            read += 1;
            let page = &region.bytes[index * PAGE..(index + 1) * PAGE];
            if page.iter().any(|&b| b != 0) {
                pages.push((region.base + index as u64, crc32fast::hash(page)));
            }
        }
    }
    pages.sort_unstable_by_key(|&(page, _)| page);
    tracing::debug!(
        written = read,
        of = regions.iter().map(|r| r.written.len()).sum::<usize>(),
        "final state from the snapshot's page CRCs and the pages written since"
    );
    pages
}

fn write_page_crcs(path: &Path, pages: &[(u64, u32)]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (page, crc) in pages {
        writeln!(out, "{page:x} {crc:08x}")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    #[test]
    fn the_snapshot_crcs_and_the_written_pages_give_the_whole_memory_crcs() {
        // At the snapshot: pages 0, 1 and 2 hold A, B, C. The run zeroed page 1 and wrote D on
        // page 3; pages 0 and 2 are still the snapshot's.
        let snapshot: PageCrcs = [b'A', b'B', b'C']
            .iter()
            .enumerate()
            .map(|(i, &b)| (i as u64, crc32fast::hash(&page(b))))
            .collect();
        let now = [page(b'A'), page(0), page(b'C'), page(b'D')].concat();
        let region = WrittenRegion {
            base: 0,
            bytes: &now,
            written: vec![false, true, false, true],
        };
        let whole: PageCrcs = now
            .chunks(PAGE)
            .enumerate()
            .filter(|(_, p)| p.iter().any(|&b| b != 0))
            .map(|(i, p)| (i as u64, crc32fast::hash(p)))
            .collect();
        assert_eq!(merge_written(&snapshot, &[region]), whole);
    }
}

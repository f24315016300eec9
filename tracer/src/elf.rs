//! The ELF side of a vmlinux or user binary: its sections' bytes, its symbols, and the
//! `__fentry__` call sites recorded in `__mcount_loc`.

use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind};

use crate::model::{Symbol, SymbolKind};
use crate::IndexError;

/// Symbols sorted by address (then name, so the order is stable).
pub(crate) fn symbols<'a>(file: &object::File<'a, impl object::ReadRef<'a>>) -> Vec<Symbol> {
    let mut out: Vec<Symbol> = file
        .symbols()
        // Not `is_definition`: linker-made markers such as `__start_mcount_loc` are untyped and
        // sizeless, and they are exactly what we need.
        .filter(|s| {
            !s.is_undefined()
                && !matches!(
                    s.kind(),
                    object::SymbolKind::File | object::SymbolKind::Section
                )
        })
        .filter_map(|s| {
            let name = s.name().ok().filter(|n| !n.is_empty())?;
            // Assembly entry points (`entry_SYSCALL_64`) are untyped symbols in code sections.
            let in_code = s
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .is_some_and(|sec| sec.kind() == SectionKind::Text);
            let kind = match s.kind() {
                object::SymbolKind::Text => SymbolKind::Function,
                object::SymbolKind::Unknown if in_code => SymbolKind::Function,
                object::SymbolKind::Data => SymbolKind::Object,
                _ => SymbolKind::Other,
            };
            Some(Symbol {
                name: name.to_owned(),
                address: s.address(),
                size: s.size(),
                kind,
                global: s.is_global(),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.address, &a.name).cmp(&(b.address, &b.name)));
    out
}

/// Reads `len` bytes at virtual address `addr` from the section that holds them.
pub(crate) fn read_at<'a>(
    file: &object::File<'a, impl object::ReadRef<'a>>,
    addr: u64,
    len: u64,
) -> Option<&'a [u8]> {
    file.sections()
        .filter(|s| s.kind() != SectionKind::UninitializedData && s.address() != 0)
        .find(|s| addr >= s.address() && addr + len <= s.address() + s.size())
        .and_then(|s| {
            let data = s.data().ok()?;
            let off = (addr - s.address()) as usize;
            data.get(off..off + len as usize)
        })
}

/// The `__fentry__` call sites: the `__mcount_loc` table of a `CONFIG_FUNCTION_TRACER` kernel,
/// each entry checked to be a 5-byte `call __fentry__` (or the NOP ftrace makes of it). Empty for a
/// binary without the table.
pub(crate) fn fentry_sites<'a>(
    file: &object::File<'a, impl object::ReadRef<'a>>,
    by_name: &HashMap<&str, u64>,
) -> Result<Vec<u64>, IndexError> {
    let (Some(&start), Some(&stop)) = (
        by_name.get("__start_mcount_loc"),
        by_name.get("__stop_mcount_loc"),
    ) else {
        return Ok(Vec::new());
    };
    let Some(&fentry) = by_name.get("__fentry__") else {
        return Err(IndexError::Fentry(
            "__mcount_loc without a __fentry__ symbol".into(),
        ));
    };
    let table = read_at(file, start, stop.saturating_sub(start))
        .ok_or_else(|| IndexError::Fentry("cannot read the __mcount_loc table".into()))?;
    let mut sites = Vec::with_capacity(table.len() / 8);
    let mut bad = 0usize;
    for entry in table.chunks_exact(8) {
        let site = u64::from_le_bytes(entry.try_into().expect("8-byte chunk"));
        // Sites in code the linker discarded (overridden weak functions) are zeroed.
        if site == 0 {
            continue;
        }
        match read_at(file, site, 5) {
            Some(&[0xe8, a, b, c, d]) => {
                let rel = i32::from_le_bytes([a, b, c, d]) as i64;
                if site.wrapping_add(5).wrapping_add(rel as u64) == fentry {
                    sites.push(site);
                } else {
                    bad += 1;
                }
            }
            Some(&[0x0f, 0x1f, 0x44, 0x00, 0x00]) => sites.push(site),
            _ => bad += 1,
        }
    }
    // A few entries in discarded or init code may not check out; most must, or we are reading
    // the table wrong.
    if bad > sites.len() / 10 {
        return Err(IndexError::Fentry(format!(
            "{bad} of {} __mcount_loc entries are not calls to __fentry__",
            bad + sites.len()
        )));
    }
    if bad > 0 {
        tracing::debug!("{bad} __mcount_loc entries are not calls to __fentry__");
    }
    sites.sort_unstable();
    sites.dedup();
    Ok(sites)
}

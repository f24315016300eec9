//! The index: built once per binary from its ELF and DWARF, queried by the trace pass, and
//! cached as bytes by whoever owns the cache.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use object::{Object, ObjectSection, SectionKind};
use serde::{Deserialize, Serialize};

use crate::dwarf::{self, R};
use crate::merge::merge;
use crate::model::{
    CurrentTask, Function, Inlined, Layout, Symbol, SymbolKind, SyscallParam, TypeId,
};
use crate::returns::ReturnSite;
use crate::types::{TypeTable, ValueKind};
use crate::IndexError;

/// Bumped whenever the serialized shape or what the index holds changes; a cache in another
/// format is rebuilt. (3: system calls whose body is out of line have their signature.)
const FORMAT: u32 = 3;
const MAGIC: &[u8; 8] = b"rrridx\0\0";

/// Everything the trace pass needs to know about one kernel (or user binary).
#[derive(Debug, Serialize, Deserialize)]
pub struct Index {
    /// Compilation unit names (source paths), indexed by `Function::unit`.
    pub units: Vec<String>,
    /// The kernel source tree's root when unit names are absolute paths into it (an out-of-tree
    /// build names `/…/linux-source-6.12/fs/open.c`); [`Index::source_path`] strips it.
    pub source_root: Option<String>,
    /// Functions with code, sorted by entry address.
    pub functions: Vec<Function>,
    /// Inlined instances, sorted by caller (then address).
    pub inlined: Vec<Inlined>,
    pub types: TypeTable,
    /// Named struct and union layouts, one per name.
    pub layouts: BTreeMap<String, Layout>,
    /// ELF symbols sorted by address.
    pub symbols: Vec<Symbol>,
    /// `call __fentry__` sites, sorted.
    pub fentry_sites: Vec<u64>,
    /// Where traceable functions in the permanent text return, sorted by address.
    pub return_sites: Vec<ReturnSite>,
    /// System call signatures by name (`openat`), from `__do_sys_openat`'s DWARF. Calls defined
    /// without arguments have none.
    pub syscalls: BTreeMap<String, Vec<SyscallParam>>,
    pub current_task: Option<CurrentTask>,
    /// Units the walk could not read (their functions are missing, symbols still name them).
    pub bad_units: usize,
    /// Whether the functions came from DWARF. Without it they come from the ELF symbols: names
    /// and address ranges, no parameters, no types.
    pub dwarf: bool,
    #[serde(skip)]
    pub(crate) by_name: HashMap<String, Vec<u32>>,
    #[serde(skip)]
    pub(crate) symbols_by_name: HashMap<String, u32>,
    /// Every function range (hot and cold parts) sorted by start: (start, end, function).
    #[serde(skip)]
    pub(crate) ranges: Vec<(u64, u64, u32)>,
}

/// Options for [`Index::build_with`].
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Threads for the DWARF walk.
    pub threads: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(8),
        }
    }
}

impl Index {
    /// Indexes the ELF file at `path` (a `vmlinux`, or a user binary built with `-g`).
    pub fn build(path: &Path) -> Result<Index, IndexError> {
        Index::build_with(path, BuildOptions::default())
    }

    pub fn build_with(path: &Path, opts: BuildOptions) -> Result<Index, IndexError> {
        let file = File::open(path).map_err(|source| IndexError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Only the sections we read are loaded: a distribution vmlinux is mostly relocations
        // and debug sections we never touch.
        let cache = object::ReadCache::new(file);
        let elf = object::File::parse(&cache).map_err(|source| IndexError::Elf {
            path: path.to_owned(),
            source,
        })?;
        for s in elf.sections() {
            let compressed = s
                .compressed_file_range()
                .map(|r| r.format != object::CompressionFormat::None)
                .unwrap_or(false);
            if compressed && s.name().is_ok_and(|n| n.starts_with(".debug_")) {
                return Err(IndexError::Compressed {
                    path: path.to_owned(),
                });
            }
        }
        let dwarf = gimli::Dwarf::load(|id| -> Result<R<'_>, IndexError> {
            let data = elf
                .section_by_name(id.name())
                .and_then(|s| s.data().ok())
                .unwrap_or(&[]);
            Ok(gimli::EndianSlice::new(data, gimli::LittleEndian))
        })?;
        let partials = dwarf::walk(&dwarf, opts.threads)?;

        let symbols = crate::elf::symbols(&elf);
        let by_addr_name: HashMap<&str, u64> = symbols
            .iter()
            .map(|s| (s.name.as_str(), s.address))
            .collect();
        let fentry_sites = crate::elf::fentry_sites(&elf, &by_addr_name)?;
        let code: Vec<(u64, u64)> = elf
            .sections()
            .filter(|s| s.kind() == SectionKind::Text && s.address() != 0)
            .map(|s| (s.address(), s.address() + s.size()))
            .collect();
        let percpu = elf
            .section_by_name(".data..percpu")
            .map(|s| (s.address(), s.address() + s.size()));

        let text = match (by_addr_name.get("_stext"), by_addr_name.get("_etext")) {
            (Some(&start), Some(&end)) => (start, end),
            // A user binary: its text sections are all permanent.
            _ => code
                .iter()
                .fold((u64::MAX, 0), |(lo, hi), &(s, e)| (lo.min(s), hi.max(e))),
        };
        let thunk = by_addr_name.get("__x86_return_thunk").copied();
        let (mut index, unlocated) = merge(partials, &code);
        index.dwarf = !index.functions.is_empty();
        if !index.dwarf {
            index.functions = functions_from_symbols(&symbols);
            index.units.push(String::new());
        }
        index.symbols = symbols;
        index.fentry_sites = fentry_sites;
        index.finish_lookups();
        index.attach_fentry();
        index.fill_abi_locations(&unlocated);
        index.return_sites =
            crate::returns::return_sites(&index.functions, text, thunk, |addr, len| {
                crate::elf::read_at(&elf, addr, len)
            });
        index.current_task = index.find_current_task(percpu);
        index.source_root = source_root(&index.units);
        Ok(index)
    }

    /// The index as bytes for a cache file (magic, format version, postcard body).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT.to_le_bytes());
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Writes the cache file at `path` atomically (a temporary file renamed into place), so a
    /// reader never sees half an index.
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let io = |source| IndexError::Write {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, self.to_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a cache file written by [`Index::save`].
    pub fn load(path: &Path) -> Result<Index, IndexError> {
        let bytes = std::fs::read(path).map_err(|source| IndexError::Read {
            path: path.to_owned(),
            source,
        })?;
        Index::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Index, IndexError> {
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .and_then(|b| b.strip_prefix(FORMAT.to_le_bytes().as_slice()))
            .ok_or(IndexError::CacheFormat)?;
        let mut index: Index = postcard::from_bytes(body).map_err(IndexError::CacheDecode)?;
        index.types.rebuild_ids();
        index.finish_lookups();
        Ok(index)
    }

    pub(crate) fn finish_lookups(&mut self) {
        self.by_name.clear();
        for (i, f) in self.functions.iter().enumerate() {
            self.by_name
                .entry(f.name.clone())
                .or_default()
                .push(i as u32);
        }
        self.ranges = self
            .functions
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.ranges.iter().map(move |r| (r.start, r.end, i as u32)))
            .collect();
        self.ranges.sort_unstable();
        self.symbols_by_name = self
            .symbols
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i as u32))
            .collect();
    }

    /// Whether the binary had DWARF. Without it only symbols name code: a trace can still show
    /// function names from [`Index::traceable`] and [`Index::name_at`], but no arguments.
    pub fn has_dwarf(&self) -> bool {
        self.dwarf
    }

    /// The source path of `function`, relative to the kernel tree where there is one
    /// (`fs/open.c`): what a filter by subsystem matches against.
    pub fn source_path(&self, function: &Function) -> &str {
        let unit = &self.units[function.unit as usize];
        match &self.source_root {
            Some(root) => unit.strip_prefix(root.as_str()).unwrap_or(unit),
            None => unit,
        }
    }

    /// The functions named `name` (static functions can share a name across files).
    pub fn functions_named<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s Function> + 's {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &self.functions[i as usize])
    }

    /// The function named `name`, preferring a traceable, external one.
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions_named(name)
            .max_by_key(|f| (f.fentry.is_some(), f.external))
    }

    /// The function whose code contains `addr` (any of its ranges).
    pub fn function_at(&self, addr: u64) -> Option<&Function> {
        // Functions' ranges do not overlap, but a few nearby starts are checked in case a
        // zero-length or duplicate range sits just below.
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        self.ranges[..i]
            .iter()
            .rev()
            .take(4)
            .find(|r| (r.0..r.1).contains(&addr))
            .map(|r| &self.functions[r.2 as usize])
    }

    /// The function entered at exactly `entry`.
    pub fn function_entered_at(&self, entry: u64) -> Option<&Function> {
        let i = self.functions.partition_point(|f| f.entry < entry);
        self.functions.get(i).filter(|f| f.entry == entry)
    }

    /// The inlined instances inside function number `caller` of [`Index::functions`].
    pub fn inlined_in(&self, caller: u32) -> &[Inlined] {
        let lo = self.inlined.partition_point(|x| x.caller < caller);
        let hi = self.inlined.partition_point(|x| x.caller <= caller);
        &self.inlined[lo..hi]
    }

    pub fn symbol(&self, name: &str) -> Option<&Symbol> {
        self.symbols_by_name
            .get(name)
            .map(|&i| &self.symbols[i as usize])
    }

    /// The function symbol covering `addr`: the fallback for code without DWARF.
    pub fn symbol_at(&self, addr: u64) -> Option<&Symbol> {
        let i = self.symbols.partition_point(|s| s.address <= addr);
        self.symbols[..i]
            .iter()
            .rev()
            .filter(|s| s.kind == SymbolKind::Function)
            .take(8)
            .find(|s| addr < s.address + s.size.max(1))
    }

    /// A name for the code at `addr` and the offset into it: DWARF first, then symbols.
    pub fn name_at(&self, addr: u64) -> Option<(&str, u64)> {
        if let Some(f) = self.function_at(addr) {
            return Some((&f.name, addr.wrapping_sub(f.entry)));
        }
        self.symbol_at(addr)
            .map(|s| (s.name.as_str(), addr - s.address))
    }

    /// Every traceable site with the name of its function (DWARF, or the symbol when the
    /// function has no DWARF) and its DWARF record where there is one.
    pub fn traceable(&self) -> impl Iterator<Item = (u64, &str, Option<&Function>)> + '_ {
        self.fentry_sites.iter().map(move |&site| {
            let f = self
                .function_entered_at(site)
                .or_else(|| self.function_entered_at(site.wrapping_sub(4)))
                .filter(|f| f.fentry == Some(site));
            let name = match f {
                Some(f) => f.name.as_str(),
                None => self.symbol_at(site).map(|s| s.name.as_str()).unwrap_or("?"),
            };
            (site, name, f)
        })
    }

    /// The return site at `addr`, if a traceable function returns there.
    pub fn return_site(&self, addr: u64) -> Option<&ReturnSite> {
        self.return_sites
            .binary_search_by_key(&addr, |s| s.address)
            .ok()
            .map(|i| &self.return_sites[i])
    }

    pub fn type_name(&self, ty: TypeId) -> String {
        self.types.name(ty)
    }

    pub fn value_kind(&self, ty: TypeId) -> ValueKind<'_> {
        self.types.value_kind(ty)
    }
}

/// The directory a kernel's `init/main.c` unit sits under, when unit names are absolute.
/// Functions as the symbol table gives them, for a binary without DWARF: each function symbol
/// with a size, in the one nameless unit.
fn functions_from_symbols(symbols: &[Symbol]) -> Vec<Function> {
    let mut functions: Vec<Function> = symbols
        .iter()
        .filter(|s| s.kind == SymbolKind::Function && s.size > 0)
        .map(|s| Function {
            name: s.name.clone(),
            entry: s.address,
            ranges: vec![crate::model::Range {
                start: s.address,
                end: s.address + s.size,
            }],
            params: Vec::new(),
            ret: None,
            variadic: false,
            external: s.global,
            unit: 0,
            fentry: None,
        })
        .collect();
    functions.sort_by_key(|f| f.entry);
    functions.dedup_by_key(|f| f.entry);
    functions
}

fn source_root(units: &[String]) -> Option<String> {
    units
        .iter()
        .filter(|u| u.starts_with('/'))
        .find_map(|u| u.strip_suffix("init/main.c"))
        .map(str::to_owned)
}

//! The index: built once per binary from its ELF and DWARF, queried by the trace pass, and
//! cached as bytes by whoever owns the cache.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use object::{Object, ObjectSection, SectionKind};
use serde::{Deserialize, Serialize};

use crate::dwarf::{self, R};
use crate::location::abi_registers;
use crate::model::{
    CurrentTask, Function, Inlined, Layout, Location, Member, Symbol, SymbolKind, Type, TypeId,
};
use crate::types::{TypeTable, ValueKind};
use crate::IndexError;

/// Bumped whenever the serialized shape changes; a cache in another format is rebuilt.
const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"rrridx\0\0";

/// Everything the trace pass needs to know about one kernel (or user binary).
#[derive(Debug, Serialize, Deserialize)]
pub struct Index {
    /// Compilation unit names (source paths), indexed by `Function::unit`.
    pub units: Vec<String>,
    /// Functions with code, sorted by entry address.
    pub functions: Vec<Function>,
    /// Inlined instances, sorted by caller (then address).
    pub inlined: Vec<Inlined>,
    pub types: TypeTable,
    /// Named struct and union layouts, one per name.
    pub layouts: HashMap<String, Layout>,
    /// ELF symbols sorted by address.
    pub symbols: Vec<Symbol>,
    /// `call __fentry__` sites, sorted.
    pub fentry_sites: Vec<u64>,
    pub current_task: Option<CurrentTask>,
    /// Units the walk could not read (their functions are missing, symbols still name them).
    pub bad_units: usize,
    #[serde(skip)]
    by_name: HashMap<String, Vec<u32>>,
    #[serde(skip)]
    symbols_by_name: HashMap<String, u32>,
    /// Every function range (hot and cold parts) sorted by start: (start, end, function).
    #[serde(skip)]
    ranges: Vec<(u64, u64, u32)>,
}

/// A member found by path: its offset from the start of the outer struct, and its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    pub offset: u64,
    pub ty: TypeId,
    pub bits: Option<(u16, u16)>,
}

/// The `task_struct` offsets guest introspection reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    pub pid: u64,
    pub tgid: u64,
    pub comm: u64,
    pub comm_len: u64,
    pub mm: u64,
    pub real_parent: u64,
    pub group_leader: u64,
    pub flags: u64,
    /// `__state` (5.14 and later) or `state`.
    pub state: u64,
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

        let (mut index, unlocated) = merge(partials, &code);
        index.symbols = symbols;
        index.fentry_sites = fentry_sites;
        index.finish_lookups();
        index.attach_fentry();
        index.fill_abi_locations(&unlocated);
        index.current_task = index.find_current_task(percpu);
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

    fn finish_lookups(&mut self) {
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

    pub fn type_name(&self, ty: TypeId) -> String {
        self.types.name(ty)
    }

    pub fn value_kind(&self, ty: TypeId) -> ValueKind<'_> {
        self.types.value_kind(ty)
    }

    pub fn layout(&self, name: &str) -> Option<&Layout> {
        self.layouts.get(name)
    }

    /// A member by dotted path, through nested and anonymous structs and unions:
    /// `member("task_struct", "pid")`, `member("pcpu_hot", "current_task")`,
    /// `member("task_struct", "se.vruntime")`.
    pub fn member(&self, strukt: &str, path: &str) -> Result<MemberInfo, IndexError> {
        let no_member = || IndexError::NoMember {
            strukt: strukt.to_owned(),
            path: path.to_owned(),
        };
        let layout = self
            .layouts
            .get(strukt)
            .ok_or_else(|| IndexError::NoStruct(strukt.to_owned()))?;
        let mut members: &[Member] = &layout.members;
        let mut found: Option<MemberInfo> = None;
        for part in path.split('.') {
            if let Some(f) = found {
                members = self.members_of(f.ty).ok_or_else(no_member)?;
            }
            let (m, off) = self.find_member(members, part, 0).ok_or_else(no_member)?;
            found = Some(MemberInfo {
                offset: found.map_or(0, |f| f.offset) + off,
                ty: m.ty,
                bits: m.bits,
            });
        }
        found.ok_or_else(no_member)
    }

    pub fn member_offset(&self, strukt: &str, path: &str) -> Option<u64> {
        self.member(strukt, path).ok().map(|m| m.offset)
    }

    /// The `task_struct` offsets the tracer needs for pid, tid, comm and the parent.
    pub fn task_layout(&self) -> Result<TaskLayout, IndexError> {
        let off = |p: &str| self.member("task_struct", p).map(|m| m.offset);
        let comm = self.member("task_struct", "comm")?;
        Ok(TaskLayout {
            pid: off("pid")?,
            tgid: off("tgid")?,
            comm: comm.offset,
            comm_len: self.types.size_of(comm.ty).unwrap_or(16),
            mm: off("mm")?,
            real_parent: off("real_parent")?,
            group_leader: off("group_leader")?,
            flags: off("flags")?,
            state: off("__state").or_else(|_| off("state"))?,
        })
    }

    fn members_of(&self, ty: TypeId) -> Option<&[Member]> {
        match self.types.get(self.types.strip(ty)) {
            Type::Struct { name: Some(n), .. } => self.layouts.get(n).map(|l| l.members.as_slice()),
            Type::Struct {
                name: None,
                members,
                ..
            } => Some(members),
            _ => None,
        }
    }

    fn find_member<'s>(
        &'s self,
        members: &'s [Member],
        name: &str,
        depth: u32,
    ) -> Option<(&'s Member, u64)> {
        if let Some(m) = members.iter().find(|m| m.name.as_deref() == Some(name)) {
            return Some((m, m.offset));
        }
        if depth > 8 {
            return None;
        }
        // Members of anonymous structs and unions read as members of the parent.
        members
            .iter()
            .filter(|m| m.name.is_none())
            .find_map(|anon| {
                let inner = self.members_of(anon.ty)?;
                self.find_member(inner, name, depth + 1)
                    .map(|(m, off)| (m, anon.offset + off))
            })
    }

    fn attach_fentry(&mut self) {
        for i in 0..self.fentry_sites.len() {
            let site = self.fentry_sites[i];
            // With IBT the function starts with a 4-byte `endbr64` before the call.
            for entry in [site, site.wrapping_sub(4)] {
                let j = self.functions.partition_point(|f| f.entry < entry);
                let mut hit = false;
                for f in self.functions[j..]
                    .iter_mut()
                    .take_while(|f| f.entry == entry)
                {
                    f.fentry = Some(site);
                    hit = true;
                }
                if hit {
                    break;
                }
            }
        }
    }

    /// Parameters without a DWARF location get the SysV register, unless the compiler changed
    /// the function's signature (`.isra`, `.constprop`, `.part` clones), where the original
    /// order says nothing.
    fn fill_abi_locations(&mut self, unlocated: &[(u32, u16)]) {
        let mut by_function: HashMap<u32, Vec<u16>> = HashMap::new();
        for &(f, p) in unlocated {
            by_function.entry(f).or_default().push(p);
        }
        for (fi, params) in by_function {
            let entry = self.functions[fi as usize].entry;
            let clone = self
                .symbol_at(entry)
                .filter(|s| s.address == entry)
                .is_some_and(|s| s.name.contains('.'));
            if clone {
                continue;
            }
            let sizes: Vec<Option<u64>> = self.functions[fi as usize]
                .params
                .iter()
                .map(|p| self.types.size_of(p.ty))
                .collect();
            let abi = abi_registers(&sizes);
            for pi in params {
                let loc = &abi[pi as usize];
                if matches!(loc, Location::Abi(_)) {
                    self.functions[fi as usize].params[pi as usize].location = loc.clone();
                }
            }
        }
    }

    fn find_current_task(&self, percpu: Option<(u64, u64)>) -> Option<CurrentTask> {
        let per_cpu = |addr: u64| percpu.is_some_and(|(lo, hi)| (lo..hi).contains(&addr));
        if let Some(s) = self.symbol("current_task") {
            return Some(CurrentTask {
                symbol: s.name.clone(),
                address: s.address,
                per_cpu: per_cpu(s.address),
            });
        }
        let s = self.symbol("pcpu_hot")?;
        let off = self.member_offset("pcpu_hot", "current_task")?;
        Some(CurrentTask {
            symbol: s.name.clone(),
            address: s.address + off,
            per_cpu: per_cpu(s.address),
        })
    }
}

/// Folds the walkers' partial results into one index: one type table, functions sorted by
/// entry, code the linker discarded dropped. Also returns the parameters DWARF gave no location
/// for, as (function, parameter) in the merged order.
fn merge(partials: Vec<dwarf::Partial>, code: &[(u64, u64)]) -> (Index, Vec<(u32, u16)>) {
    let in_code = |a: u64| code.iter().any(|(lo, hi)| (*lo..*hi).contains(&a));
    let mut types = TypeTable::default();
    let mut units = Vec::new();
    let mut functions: Vec<Function> = Vec::new();
    let mut inlined = Vec::new();
    let mut layouts: HashMap<String, Layout> = HashMap::new();
    let mut bad_units = 0;
    let mut unlocated = Vec::new();
    for part in partials {
        let map = types.absorb(part.types);
        let m = |id: TypeId| map[id.0 as usize];
        let unit_base = units.len() as u32;
        units.extend(part.units);
        bad_units += part.bad_units;
        // Where each partial function lands (None: dropped as discarded code).
        let mut fmap: Vec<Option<u32>> = Vec::with_capacity(part.functions.len());
        for mut f in part.functions {
            if !in_code(f.entry) {
                fmap.push(None);
                continue;
            }
            f.unit += unit_base;
            f.ret = f.ret.map(m);
            for p in &mut f.params {
                p.ty = m(p.ty);
            }
            fmap.push(Some(functions.len() as u32));
            functions.push(f);
        }
        for (fi, pi) in part.no_location {
            if let Some(Some(f)) = fmap.get(fi as usize) {
                unlocated.push((*f, pi));
            }
        }
        for mut x in part.inlined {
            if let Some(Some(c)) = fmap.get(x.caller as usize) {
                x.caller = *c;
                inlined.push(x);
            }
        }
        for (name, mut layout) in part.layouts {
            if layouts.contains_key(&name) {
                continue;
            }
            for mb in &mut layout.members {
                mb.ty = m(mb.ty);
            }
            layouts.insert(name, layout);
        }
    }
    // Sort functions by entry and carry the inlined instances' caller indices along.
    let mut order: Vec<u32> = (0..functions.len() as u32).collect();
    order.sort_by_key(|&i| (functions[i as usize].entry, i));
    let mut new_pos = vec![0u32; functions.len()];
    for (pos, &old) in order.iter().enumerate() {
        new_pos[old as usize] = pos as u32;
    }
    let mut slots: Vec<Option<Function>> = functions.into_iter().map(Some).collect();
    let functions: Vec<Function> = order
        .iter()
        .map(|&i| slots[i as usize].take().expect("each function moves once"))
        .collect();
    for x in &mut inlined {
        x.caller = new_pos[x.caller as usize];
    }
    inlined.sort_by_key(|x: &Inlined| (x.caller, x.entry));
    let unlocated = unlocated
        .into_iter()
        .map(|(f, p)| (new_pos[f as usize], p))
        .collect();
    let index = Index {
        units,
        functions,
        inlined,
        types,
        layouts,
        symbols: Vec::new(),
        fentry_sites: Vec::new(),
        current_task: None,
        bad_units,
        by_name: HashMap::new(),
        symbols_by_name: HashMap::new(),
        ranges: Vec::new(),
    };
    (index, unlocated)
}

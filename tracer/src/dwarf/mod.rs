//! The DWARF walk: every compilation unit's functions (with parameters and where they are at
//! entry), inlined instances, and named struct layouts, with types resolved into a type table.
//!
//! Units are independent, so they are walked on a few threads, each into its own `Partial`
//! (its own type table); the index merges the partials afterwards.

#![allow(non_upper_case_globals)] // gimli's DW_* constants are matched as patterns

mod types;

use std::collections::HashMap;

use gimli::constants::*;
use gimli::{
    AttributeValue, DebuggingInformationEntry, Dwarf, EndianSlice, LittleEndian, Unit, UnitOffset,
};

use crate::location::{at_entry, FrameBase};
use crate::model::{Function, Inlined, Layout, Location, Param, Range, SyscallParam, Type, TypeId};
use crate::types::TypeTable;
use crate::IndexError;

pub(crate) type R<'a> = EndianSlice<'a, LittleEndian>;
type Die<'a> = DebuggingInformationEntry<R<'a>>;

/// Type chains deeper than this are cut (a malformed or cyclic chain must not hang the walk).
const MAX_TYPE_DEPTH: u32 = 48;

/// What one thread's share of the units yielded. Type ids index `types`, unit indices `units`,
/// `Inlined::caller` indexes `functions`.
#[derive(Default)]
pub(crate) struct Partial {
    pub units: Vec<String>,
    pub functions: Vec<Function>,
    pub inlined: Vec<Inlined>,
    pub types: TypeTable,
    /// Named layouts with the ordinal of the unit that defined them: where two units define
    /// different structs under one name, the merge keeps the first unit's, whichever thread
    /// walked it, so the index does not depend on scheduling.
    pub layouts: HashMap<String, (usize, Layout)>,
    /// Parameters DWARF gives no location for: (function, parameter). The index fills them from
    /// the ABI where the function kept its signature.
    pub no_location: Vec<(u32, u16)>,
    /// System call signatures: `__do_sys_NAME`'s parameters (name, type), from its abstract
    /// instance (it is always inlined into the `__x64_sys_NAME` wrapper, which only takes
    /// `pt_regs`).
    pub syscalls: Vec<(String, Vec<SyscallParam>)>,
    pub bad_units: usize,
}

/// Walks every unit on `threads` threads. Thread `k` takes units `k`, `k + threads`, ...: a fixed
/// share, so the same thread count always yields the same index.
pub(crate) fn walk(dwarf: &Dwarf<R<'_>>, threads: usize) -> Result<Vec<Partial>, IndexError> {
    let mut headers = Vec::new();
    let mut iter = dwarf.units();
    while let Some(h) = iter.next()? {
        headers.push(h);
    }
    let threads = threads.max(1);
    let headers = &headers;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || {
                    let mut part = Partial::default();
                    for (ordinal, h) in headers.iter().enumerate().skip(k).step_by(threads) {
                        let unit = match dwarf.unit(*h) {
                            Ok(u) => u,
                            Err(e) => {
                                tracing::debug!("unit at {:?}: {e}", h.offset());
                                part.bad_units += 1;
                                continue;
                            }
                        };
                        if let Err(e) = UnitWalker::new(dwarf, &unit, ordinal, &mut part).walk() {
                            // One unreadable unit loses its functions, not the whole index.
                            tracing::debug!("unit at {:?}: {e}", h.offset());
                            part.bad_units += 1;
                        }
                    }
                    part
                })
            })
            .collect();
        Ok(workers
            .into_iter()
            .map(|w| w.join().expect("a DWARF walker thread panicked"))
            .collect())
    })
}

enum Scope {
    /// A function with code, and how its frame base is computed.
    Function {
        idx: u32,
        entry: u64,
        frame_base: FrameBase,
    },
    /// A subprogram without code (abstract or a declaration): its children are not parameters
    /// of anything we index.
    Abstract,
    /// The abstract instance of a system call's body (`__do_sys_NAME`): its parameters are
    /// the system call's, with their types (an index into `Partial::syscalls`).
    Syscall(usize),
    Other,
}

struct UnitWalker<'a, 'u> {
    dwarf: &'u Dwarf<R<'a>>,
    unit: &'u Unit<R<'a>>,
    part: &'u mut Partial,
    /// The unit's position in `.debug_info`.
    ordinal: usize,
    unit_idx: u32,
    types: HashMap<UnitOffset, TypeId>,
    origin_names: HashMap<UnitOffset, Option<String>>,
}

impl<'a, 'u> UnitWalker<'a, 'u> {
    fn new(
        dwarf: &'u Dwarf<R<'a>>,
        unit: &'u Unit<R<'a>>,
        ordinal: usize,
        part: &'u mut Partial,
    ) -> Self {
        UnitWalker {
            dwarf,
            unit,
            ordinal,
            unit_idx: part.units.len() as u32,
            part,
            types: HashMap::new(),
            origin_names: HashMap::new(),
        }
    }

    fn walk(&mut self) -> Result<(), IndexError> {
        let unit = self.unit;
        let mut cursor = unit.entries();
        let mut stack: Vec<(isize, Scope)> = Vec::new();
        while let Some(die) = cursor.next_dfs()? {
            let depth = die.depth();
            while stack.last().is_some_and(|(d, _)| *d >= depth) {
                stack.pop();
            }
            let parent = stack
                .last()
                .filter(|(d, _)| *d == depth - 1)
                .map(|(_, s)| s);
            let scope = match die.tag() {
                DW_TAG_compile_unit | DW_TAG_partial_unit => {
                    let name = self.name(die)?.unwrap_or_default();
                    self.unit_idx = self.part.units.len() as u32;
                    self.part.units.push(name);
                    Scope::Other
                }
                DW_TAG_subprogram => match self.function(die)? {
                    Some((f, frame_base)) => {
                        let idx = self.part.functions.len() as u32;
                        let entry = f.entry;
                        self.part.functions.push(f);
                        Scope::Function {
                            idx,
                            entry,
                            frame_base,
                        }
                    }
                    None => self.syscall(die)?,
                },
                DW_TAG_formal_parameter if matches!(parent, Some(Scope::Syscall(_))) => {
                    if let Some(&Scope::Syscall(at)) = parent {
                        let name = self.name(die)?;
                        let ty = match type_ref(die) {
                            Some(off) => self.type_at(off, 0)?,
                            None => self.part.types.intern(Type::Unknown),
                        };
                        self.part.syscalls[at].1.push(SyscallParam { name, ty });
                    }
                    Scope::Other
                }
                DW_TAG_formal_parameter => {
                    if let Some(&Scope::Function {
                        idx,
                        entry,
                        frame_base,
                    }) = parent
                    {
                        self.param(die, idx, entry, frame_base)?;
                    }
                    Scope::Other
                }
                DW_TAG_unspecified_parameters => {
                    if let Some(&Scope::Function { idx, .. }) = parent {
                        self.part.functions[idx as usize].variadic = true;
                    }
                    Scope::Other
                }
                DW_TAG_inlined_subroutine => {
                    let caller = stack.iter().rev().find_map(|(_, s)| match s {
                        Scope::Function { idx, .. } => Some(*idx),
                        _ => None,
                    });
                    if let Some(caller) = caller {
                        self.inlined(die, caller)?;
                    }
                    Scope::Other
                }
                DW_TAG_structure_type | DW_TAG_union_type | DW_TAG_class_type if depth == 1 => {
                    if let Some(name) = self.name(die)? {
                        if !self.part.layouts.contains_key(&name)
                            && !die.has_attr(DW_AT_declaration)
                        {
                            self.layout(die.offset(), name, die.tag() == DW_TAG_union_type)?;
                        }
                    }
                    Scope::Other
                }
                _ => Scope::Other,
            };
            if die.has_children() {
                stack.push((depth, scope));
            }
        }
        Ok(())
    }

    /// A subprogram without code: a system call's signature if it is `__do_sys_NAME`'s
    /// abstract instance, otherwise nothing we index.
    fn syscall(&mut self, die: &Die<'a>) -> Result<Scope, IndexError> {
        if die.has_attr(DW_AT_declaration) {
            return Ok(Scope::Abstract);
        }
        let Some(name) = self.name(die)? else {
            return Ok(Scope::Abstract);
        };
        let Some(call) = name.strip_prefix("__do_sys_") else {
            return Ok(Scope::Abstract);
        };
        self.part.syscalls.push((call.to_owned(), Vec::new()));
        Ok(Scope::Syscall(self.part.syscalls.len() - 1))
    }

    /// A subprogram with code becomes a function; one without (abstract, declaration) is `None`.
    fn function(&mut self, die: &Die<'a>) -> Result<Option<(Function, FrameBase)>, IndexError> {
        let ranges = self.ranges(die)?;
        if ranges.is_empty() {
            return Ok(None);
        }
        let chain = self.origins(die)?;
        let mut name = None;
        let mut ret = None;
        let mut external = false;
        for d in std::iter::once(die).chain(chain.iter()) {
            if name.is_none() {
                name = self.name(d)?;
            }
            if ret.is_none() {
                ret = type_ref(d);
            }
            external |= d.has_attr(DW_AT_external);
        }
        let Some(name) = name else {
            return Ok(None);
        };
        let ret = match ret {
            Some(off) => Some(self.type_at(off, 0)?),
            None => None,
        };
        let entry = match self.address(die, DW_AT_entry_pc)? {
            Some(a) => a,
            None => self.address(die, DW_AT_low_pc)?.unwrap_or(ranges[0].start),
        };
        let frame_base = match die.attr_value(DW_AT_frame_base) {
            Some(AttributeValue::Exprloc(e)) if e.0.slice() == [DW_OP_call_frame_cfa.0] => {
                FrameBase::Cfa
            }
            _ => FrameBase::Other,
        };
        Ok(Some((
            Function {
                name,
                entry,
                ranges,
                params: Vec::new(),
                ret,
                variadic: false,
                external,
                unit: self.unit_idx,
                fentry: None,
            },
            frame_base,
        )))
    }

    fn param(
        &mut self,
        die: &Die<'a>,
        func: u32,
        entry: u64,
        frame_base: FrameBase,
    ) -> Result<(), IndexError> {
        let chain = self.origins(die)?;
        let mut name = None;
        let mut ty = None;
        for d in std::iter::once(die).chain(chain.iter()) {
            if name.is_none() {
                name = self.name(d)?;
            }
            if ty.is_none() {
                ty = type_ref(d);
            }
        }
        let ty = match ty {
            Some(off) => self.type_at(off, 0)?,
            None => self.part.types.intern(Type::Unknown),
        };
        let location = match die.attr_value(DW_AT_location) {
            Some(AttributeValue::Exprloc(e)) => Some(at_entry(e, self.unit.encoding(), frame_base)),
            Some(v) => match self.dwarf.attr_locations(self.unit, v)? {
                Some(mut list) => {
                    let mut found = Location::Unavailable;
                    while let Some(l) = list.next()? {
                        if (l.range.begin..l.range.end).contains(&entry) {
                            found = at_entry(l.data, self.unit.encoding(), frame_base);
                            break;
                        }
                    }
                    Some(found)
                }
                None => None,
            },
            // A constant the compiler propagated into this copy: nothing arrives at entry.
            None if die.has_attr(DW_AT_const_value) => Some(Location::Unavailable),
            None => None,
        };
        let f = &mut self.part.functions[func as usize];
        if location.is_none() {
            self.part.no_location.push((func, f.params.len() as u16));
        }
        f.params.push(Param {
            name,
            ty,
            location: location.unwrap_or(Location::Unavailable),
        });
        Ok(())
    }

    fn inlined(&mut self, die: &Die<'a>, caller: u32) -> Result<(), IndexError> {
        let ranges = self.ranges(die)?;
        // An instance whose code merged into its caller's has an entry but an empty range.
        let entry = match self.address(die, DW_AT_entry_pc)? {
            Some(a) => a,
            None => match self.address(die, DW_AT_low_pc)? {
                Some(a) => a,
                None => ranges.first().map_or(0, |r| r.start),
            },
        };
        if entry == 0 {
            return Ok(());
        }
        let name = match die.attr_value(DW_AT_abstract_origin) {
            Some(AttributeValue::UnitRef(off)) => match self.origin_names.get(&off) {
                Some(n) => n.clone(),
                None => {
                    let origin = self.unit.entry(off)?;
                    let chain = self.origins(&origin)?;
                    let mut n = self.name(&origin)?;
                    for d in &chain {
                        if n.is_none() {
                            n = self.name(d)?;
                        }
                    }
                    self.origin_names.insert(off, n.clone());
                    n
                }
            },
            _ => self.name(die)?,
        };
        let Some(name) = name else {
            return Ok(());
        };
        let call_line = die
            .attr(DW_AT_call_line)
            .and_then(|a| a.udata_value())
            .map(|l| l as u32);
        self.part.inlined.push(Inlined {
            name,
            entry,
            ranges,
            caller,
            call_line,
        });
        Ok(())
    }

    /// The DIEs this one refers back to (`DW_AT_abstract_origin`, `DW_AT_specification`), nearest
    /// first: a concrete instance takes its name and types from there.
    fn origins(&self, die: &Die<'a>) -> Result<Vec<Die<'a>>, IndexError> {
        let mut out: Vec<Die<'a>> = Vec::new();
        let mut next = origin_ref(die);
        while let Some(off) = next {
            if out.len() >= 4 {
                break;
            }
            let d = self.unit.entry(off)?;
            next = origin_ref(&d);
            out.push(d);
        }
        Ok(out)
    }

    fn ranges(&self, die: &Die<'a>) -> Result<Vec<Range>, IndexError> {
        let mut out = Vec::new();
        let mut iter = self.dwarf.die_ranges(self.unit, die)?;
        while let Some(r) = iter.next()? {
            // Code the linker discarded keeps its DWARF with address 0: it is nowhere.
            if r.begin != 0 && r.end > r.begin {
                out.push(Range {
                    start: r.begin,
                    end: r.end,
                });
            }
        }
        Ok(out)
    }

    /// An address attribute, through `.debug_addr` when it is an index (DWARF 5 `addrx`).
    fn address(&self, die: &Die<'a>, at: gimli::DwAt) -> Result<Option<u64>, IndexError> {
        match die.attr_value(at) {
            Some(v) => Ok(self.dwarf.attr_address(self.unit, v)?),
            None => Ok(None),
        }
    }

    fn name(&self, die: &Die<'a>) -> Result<Option<String>, IndexError> {
        match die.attr_value(DW_AT_name) {
            Some(v) => Ok(Some(
                self.dwarf
                    .attr_string(self.unit, v)?
                    .to_string_lossy()
                    .into_owned(),
            )),
            None => Ok(None),
        }
    }
}

fn type_ref(die: &Die<'_>) -> Option<UnitOffset> {
    match die.attr_value(DW_AT_type) {
        Some(AttributeValue::UnitRef(off)) => Some(off),
        _ => None,
    }
}

fn origin_ref(die: &Die<'_>) -> Option<UnitOffset> {
    match die
        .attr_value(DW_AT_abstract_origin)
        .or_else(|| die.attr_value(DW_AT_specification))
    {
        Some(AttributeValue::UnitRef(off)) => Some(off),
        _ => None,
    }
}

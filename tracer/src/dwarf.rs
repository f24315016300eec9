//! The DWARF walk: every compilation unit's functions (with parameters and where they are at
//! entry), inlined instances, and named struct layouts, with types resolved into a type table.
//!
//! Units are independent, so they are walked on a few threads, each into its own `Partial`
//! (its own type table); the index merges the partials afterwards.

#![allow(non_upper_case_globals)] // gimli's DW_* constants are matched as patterns

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use gimli::constants::*;
use gimli::{
    AttributeValue, DebuggingInformationEntry, Dwarf, EndianSlice, LittleEndian, Unit, UnitOffset,
};

use crate::location::{at_entry, FrameBase};
use crate::model::{Function, Inlined, Layout, Location, Member, Param, Range, Type, TypeId};
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
    pub layouts: HashMap<String, Layout>,
    /// Parameters DWARF gives no location for: (function, parameter). The index fills them from
    /// the ABI where the function kept its signature.
    pub no_location: Vec<(u32, u16)>,
    pub bad_units: usize,
}

/// Walks every unit on `threads` threads.
pub(crate) fn walk(dwarf: &Dwarf<R<'_>>, threads: usize) -> Result<Vec<Partial>, IndexError> {
    let mut headers = Vec::new();
    let mut iter = dwarf.units();
    while let Some(h) = iter.next()? {
        headers.push(h);
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut part = Partial::default();
                    while let Some(h) = headers.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let unit = match dwarf.unit(*h) {
                            Ok(u) => u,
                            Err(e) => {
                                tracing::debug!("unit at {:?}: {e}", h.offset());
                                part.bad_units += 1;
                                continue;
                            }
                        };
                        if let Err(e) = UnitWalker::new(dwarf, &unit, &mut part).walk() {
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
    Other,
}

struct UnitWalker<'a, 'u> {
    dwarf: &'u Dwarf<R<'a>>,
    unit: &'u Unit<R<'a>>,
    part: &'u mut Partial,
    unit_idx: u32,
    types: HashMap<UnitOffset, TypeId>,
    origin_names: HashMap<UnitOffset, Option<String>>,
}

impl<'a, 'u> UnitWalker<'a, 'u> {
    fn new(dwarf: &'u Dwarf<R<'a>>, unit: &'u Unit<R<'a>>, part: &'u mut Partial) -> Self {
        UnitWalker {
            dwarf,
            unit,
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
                    None => Scope::Abstract,
                },
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

    /// The type at `off`, resolved (once per unit) into the type table.
    fn type_at(&mut self, off: UnitOffset, depth: u32) -> Result<TypeId, IndexError> {
        if let Some(&id) = self.types.get(&off) {
            return Ok(id);
        }
        if depth > MAX_TYPE_DEPTH {
            return Ok(self.part.types.intern(Type::Unknown));
        }
        let die = self.unit.entry(off)?;
        let target = |w: &mut Self| -> Result<TypeId, IndexError> {
            match type_ref(&die) {
                Some(t) => w.type_at(t, depth + 1),
                None => Ok(w.part.types.intern(Type::Void)),
            }
        };
        let size = die
            .attr(DW_AT_byte_size)
            .and_then(|a| a.udata_value())
            .unwrap_or(0);
        let ty = match die.tag() {
            DW_TAG_base_type => {
                let name = self.name(&die)?.unwrap_or_default();
                let enc = match die.attr_value(DW_AT_encoding) {
                    Some(AttributeValue::Encoding(e)) => e,
                    _ => DW_ATE_signed,
                };
                let size = size as u8;
                match enc {
                    DW_ATE_boolean => Type::Bool { size },
                    DW_ATE_float => Type::Float { name, size },
                    DW_ATE_signed | DW_ATE_signed_char => Type::Int {
                        name,
                        size,
                        signed: true,
                        char: enc == DW_ATE_signed_char,
                    },
                    DW_ATE_unsigned | DW_ATE_unsigned_char | DW_ATE_UTF => Type::Int {
                        name,
                        size,
                        signed: false,
                        char: enc == DW_ATE_unsigned_char,
                    },
                    _ => Type::Unknown,
                }
            }
            DW_TAG_pointer_type | DW_TAG_reference_type | DW_TAG_rvalue_reference_type => {
                Type::Pointer(target(self)?)
            }
            DW_TAG_const_type => Type::Const(target(self)?),
            DW_TAG_volatile_type => Type::Volatile(target(self)?),
            // Qualifiers that change nothing about how a value reads.
            DW_TAG_restrict_type | DW_TAG_atomic_type | DW_TAG_immutable_type => {
                let id = target(self)?;
                self.types.insert(off, id);
                return Ok(id);
            }
            DW_TAG_typedef => Type::Typedef {
                name: self.name(&die)?.unwrap_or_default(),
                target: target(self)?,
            },
            DW_TAG_enumeration_type => self.enumeration(&die, size as u8)?,
            DW_TAG_structure_type | DW_TAG_union_type | DW_TAG_class_type => {
                let union = die.tag() == DW_TAG_union_type;
                let name = self.name(&die)?;
                let declaration = die.has_attr(DW_AT_declaration);
                let members = match &name {
                    Some(n) => {
                        if !declaration && !self.part.layouts.contains_key(n) {
                            self.layout(off, n.clone(), union)?;
                        }
                        Vec::new()
                    }
                    None => self.members(off, depth + 1)?,
                };
                Type::Struct {
                    union,
                    name,
                    size,
                    members,
                }
            }
            DW_TAG_array_type => {
                let element = target(self)?;
                Type::Array {
                    element,
                    count: self.array_count(off)?,
                }
            }
            DW_TAG_subroutine_type => Type::Function,
            DW_TAG_unspecified_type => Type::Void,
            _ => Type::Unknown,
        };
        let id = self.part.types.intern(ty);
        self.types.insert(off, id);
        Ok(id)
    }

    fn layout(&mut self, off: UnitOffset, name: String, union: bool) -> Result<(), IndexError> {
        // Claimed before the members resolve, so a member type naming this struct stops here.
        let size = self
            .unit
            .entry(off)?
            .attr(DW_AT_byte_size)
            .and_then(|a| a.udata_value())
            .unwrap_or(0);
        self.part.layouts.insert(
            name.clone(),
            Layout {
                union,
                size,
                members: Vec::new(),
            },
        );
        let members = self.members(off, 1)?;
        if let Some(l) = self.part.layouts.get_mut(&name) {
            l.members = members;
        }
        Ok(())
    }

    fn members(&mut self, off: UnitOffset, depth: u32) -> Result<Vec<Member>, IndexError> {
        let unit = self.unit;
        let mut raw = Vec::new();
        let mut tree = unit.entries_tree(Some(off))?;
        let root = tree.root()?;
        let mut children = root.children();
        while let Some(child) = children.next()? {
            let e = child.entry();
            if e.tag() != DW_TAG_member {
                continue;
            }
            let bit_offset = e.attr(DW_AT_data_bit_offset).and_then(|a| a.udata_value());
            let byte_offset = match e.attr_value(DW_AT_data_member_location) {
                Some(AttributeValue::Udata(v)) => Some(v),
                Some(AttributeValue::Sdata(v)) => Some(v as u64),
                Some(AttributeValue::Data1(v)) => Some(v.into()),
                Some(AttributeValue::Data2(v)) => Some(v.into()),
                Some(AttributeValue::Data4(v)) => Some(v.into()),
                Some(AttributeValue::Data8(v)) => Some(v),
                _ => None,
            };
            let bit_size = e.attr(DW_AT_bit_size).and_then(|a| a.udata_value());
            let (offset, bits) = match (byte_offset, bit_offset, bit_size) {
                (_, Some(b), Some(size)) => (b / 8, Some(((b % 8) as u16, size as u16))),
                (Some(o), _, Some(size)) => (o, Some((0, size as u16))),
                (Some(o), _, None) => (o, None),
                // A union member has no location: it sits at 0.
                (None, _, _) => (0, None),
            };
            raw.push((self.name(e)?, type_ref(e), offset, bits));
        }
        let mut members = Vec::with_capacity(raw.len());
        for (name, ty, offset, bits) in raw {
            let ty = match ty {
                Some(t) => self.type_at(t, depth + 1)?,
                None => self.part.types.intern(Type::Unknown),
            };
            members.push(Member {
                name,
                offset,
                ty,
                bits,
            });
        }
        Ok(members)
    }

    fn enumeration(&mut self, die: &Die<'a>, size: u8) -> Result<Type, IndexError> {
        let name = self.name(die)?;
        // The underlying type says the signedness; without one, a negative value does.
        let mut signed = match type_ref(die) {
            Some(t) => {
                let underlying = self.type_at(t, 1)?;
                let stripped = self.part.types.strip(underlying);
                matches!(
                    self.part.types.get(stripped),
                    Type::Int { signed: true, .. }
                )
            }
            None => false,
        };
        let unit = self.unit;
        let mut tree = unit.entries_tree(Some(die.offset()))?;
        let root = tree.root()?;
        let mut children = root.children();
        let mut enumerators = Vec::new();
        while let Some(child) = children.next()? {
            let e = child.entry();
            if e.tag() != DW_TAG_enumerator {
                continue;
            }
            let value = match e.attr_value(DW_AT_const_value) {
                Some(AttributeValue::Sdata(v)) => {
                    signed |= v < 0;
                    v
                }
                Some(AttributeValue::Udata(v)) => v as i64,
                Some(AttributeValue::Data1(v)) if signed => v as i8 as i64,
                Some(AttributeValue::Data2(v)) if signed => v as i16 as i64,
                Some(AttributeValue::Data4(v)) if signed => v as i32 as i64,
                Some(AttributeValue::Data1(v)) => v.into(),
                Some(AttributeValue::Data2(v)) => v.into(),
                Some(AttributeValue::Data4(v)) => v.into(),
                Some(AttributeValue::Data8(v)) => v as i64,
                _ => continue,
            };
            enumerators.push((self.name(e)?.unwrap_or_default(), value));
        }
        Ok(Type::Enum {
            name,
            size,
            signed,
            enumerators,
        })
    }

    fn array_count(&self, off: UnitOffset) -> Result<Option<u64>, IndexError> {
        let mut tree = self.unit.entries_tree(Some(off))?;
        let root = tree.root()?;
        let mut children = root.children();
        while let Some(child) = children.next()? {
            let e = child.entry();
            if e.tag() != DW_TAG_subrange_type {
                continue;
            }
            if let Some(n) = e.attr(DW_AT_count).and_then(|a| a.udata_value()) {
                return Ok(Some(n));
            }
            return Ok(e
                .attr(DW_AT_upper_bound)
                .and_then(|a| a.udata_value())
                .map(|u| u + 1));
        }
        Ok(None)
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

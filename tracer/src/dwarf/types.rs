//! Type resolution for the DWARF walk: a unit's type DIEs into the type table, and named struct
//! layouts into the layout table.

#![allow(non_upper_case_globals)] // gimli's DW_* constants are matched as patterns

use gimli::constants::*;
use gimli::{AttributeValue, UnitOffset};

use super::{type_ref, Die, UnitWalker, MAX_TYPE_DEPTH};
use crate::model::{Layout, Member, Type, TypeId};
use crate::IndexError;

impl<'a> UnitWalker<'a, '_> {
    /// The type at `off`, resolved (once per unit) into the type table.
    pub(super) fn type_at(&mut self, off: UnitOffset, depth: u32) -> Result<TypeId, IndexError> {
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

    pub(super) fn layout(
        &mut self,
        off: UnitOffset,
        name: String,
        union: bool,
    ) -> Result<(), IndexError> {
        // Claimed before the members resolve, so a member type naming this struct stops here.
        let size = self
            .unit
            .entry(off)?
            .attr(DW_AT_byte_size)
            .and_then(|a| a.udata_value())
            .unwrap_or(0);
        self.part.layouts.insert(
            name.clone(),
            (
                self.ordinal,
                Layout {
                    union,
                    size,
                    members: Vec::new(),
                },
            ),
        );
        let members = self.members(off, 1)?;
        if let Some((_, l)) = self.part.layouts.get_mut(&name) {
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

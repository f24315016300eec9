//! The type table: DWARF types reduced to what an argument decoder uses, hash-consed so the
//! thousands of copies of `size_t` or `struct file *` across compilation units share one id.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::model::{Type, TypeId};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TypeTable {
    types: Vec<Type>,
    #[serde(skip)]
    ids: HashMap<Type, TypeId>,
}

impl TypeTable {
    pub fn intern(&mut self, ty: Type) -> TypeId {
        if let Some(&id) = self.ids.get(&ty) {
            return id;
        }
        let id = TypeId(self.types.len() as u32);
        self.types.push(ty.clone());
        self.ids.insert(ty, id);
        id
    }

    /// Restores the interning map after deserialization (it is not stored).
    pub(crate) fn rebuild_ids(&mut self) {
        self.ids = self
            .types
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), TypeId(i as u32)))
            .collect();
    }

    pub fn get(&self, id: TypeId) -> &Type {
        &self.types[id.0 as usize]
    }

    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Re-interns every type of `other` here, returning the map from its ids to ours. Children
    /// come before parents in a table (a type is interned after its parts), so one pass works.
    pub(crate) fn absorb(&mut self, other: TypeTable) -> Vec<TypeId> {
        let mut map: Vec<TypeId> = Vec::with_capacity(other.types.len());
        for ty in other.types {
            let ty = remap(ty, &map);
            map.push(self.intern(ty));
        }
        map
    }
}

/// `ty` with its child ids translated through `map`.
pub(crate) fn remap(ty: Type, map: &[TypeId]) -> Type {
    let m = |id: TypeId| map[id.0 as usize];
    match ty {
        Type::Pointer(t) => Type::Pointer(m(t)),
        Type::Typedef { name, target } => Type::Typedef {
            name,
            target: m(target),
        },
        Type::Const(t) => Type::Const(m(t)),
        Type::Volatile(t) => Type::Volatile(m(t)),
        Type::Array { element, count } => Type::Array {
            element: m(element),
            count,
        },
        Type::Struct {
            union,
            name,
            size,
            members,
        } => Type::Struct {
            union,
            name,
            size,
            members: members
                .into_iter()
                .map(|mut mb| {
                    mb.ty = m(mb.ty);
                    mb
                })
                .collect(),
        },
        other => other,
    }
}

/// What an argument of a type is, for decoding: typedefs and qualifiers stripped, pointers
/// classified by what they point to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind<'a> {
    Int {
        size: u8,
        signed: bool,
    },
    Bool,
    /// An enum: show the enumerator's name.
    Enum {
        size: u8,
        signed: bool,
        enumerators: &'a [(String, i64)],
        flags: bool,
    },
    /// `const char *`: a NUL-terminated string in guest memory.
    Str,
    /// `char *`: a string the function may write. As an argument it is a buffer whose contents
    /// at the call are what the callee will overwrite (`vfs_read`'s `buf`, `snprintf`'s `buf`);
    /// as a return value, a string like [`ValueKind::Str`].
    CharBuffer,
    /// A pointer to a struct or union: show the address and the type name.
    StructPtr {
        name: Option<&'a str>,
        union: bool,
    },
    /// Any other pointer (`void *`, `int *`, function pointers).
    Pointer,
    Float {
        size: u8,
    },
    /// A struct or union passed by value.
    Struct {
        size: u64,
    },
    Void,
    Unknown,
}

impl TypeTable {
    /// Follows typedefs and qualifiers to the type that decides the representation.
    pub fn strip(&self, mut id: TypeId) -> TypeId {
        for _ in 0..64 {
            match self.get(id) {
                Type::Typedef { target, .. } | Type::Const(target) | Type::Volatile(target) => {
                    id = *target
                }
                _ => break,
            }
        }
        id
    }

    pub fn value_kind(&self, id: TypeId) -> ValueKind<'_> {
        match self.get(self.strip(id)) {
            Type::Void => ValueKind::Void,
            Type::Int { size, signed, .. } => ValueKind::Int {
                size: *size,
                signed: *signed,
            },
            Type::Bool { .. } => ValueKind::Bool,
            Type::Float { size, .. } => ValueKind::Float { size: *size },
            Type::Enum {
                size,
                signed,
                enumerators,
                ..
            } => ValueKind::Enum {
                size: *size,
                signed: *signed,
                enumerators,
                flags: looks_like_flags(enumerators),
            },
            Type::Pointer(target) => match self.get(self.strip(*target)) {
                Type::Int { char: true, .. } if self.is_const(*target) => ValueKind::Str,
                Type::Int { char: true, .. } => ValueKind::CharBuffer,
                Type::Struct { union, name, .. } => ValueKind::StructPtr {
                    name: name.as_deref(),
                    union: *union,
                },
                _ => ValueKind::Pointer,
            },
            Type::Struct { size, .. } => ValueKind::Struct { size: *size },
            Type::Array { .. } | Type::Function => ValueKind::Pointer,
            Type::Typedef { .. } | Type::Const(_) | Type::Volatile(_) | Type::Unknown => {
                ValueKind::Unknown
            }
        }
    }

    /// Whether `id` is `const`-qualified (through typedefs and `volatile`).
    fn is_const(&self, mut id: TypeId) -> bool {
        loop {
            match self.get(id) {
                Type::Const(_) => return true,
                Type::Typedef { target, .. } | Type::Volatile(target) => id = *target,
                _ => return false,
            }
        }
    }

    /// The size in bytes of a value of the type, where DWARF gives one.
    pub fn size_of(&self, id: TypeId) -> Option<u64> {
        match self.get(self.strip(id)) {
            Type::Int { size, .. }
            | Type::Bool { size }
            | Type::Float { size, .. }
            | Type::Enum { size, .. } => Some(u64::from(*size)),
            Type::Pointer(_) => Some(8),
            Type::Struct { size, .. } => Some(*size),
            Type::Array { element, count } => Some(self.size_of(*element)? * (*count)?),
            _ => None,
        }
    }

    /// The type as C spells it: `const char *`, `struct file *`, `size_t`.
    pub fn name(&self, id: TypeId) -> String {
        self.name_depth(id, 0)
    }

    fn name_depth(&self, id: TypeId, depth: u32) -> String {
        if depth > 16 {
            return "...".into();
        }
        match self.get(id) {
            Type::Void => "void".into(),
            Type::Int { name, .. } | Type::Float { name, .. } => name.clone(),
            Type::Bool { .. } => "_Bool".into(),
            Type::Pointer(t) => match self.get(*t) {
                Type::Function => "void (*)()".into(),
                _ => format!("{} *", self.name_depth(*t, depth + 1)),
            },
            Type::Enum { name, .. } => format!("enum {}", name.as_deref().unwrap_or("<anon>")),
            Type::Struct { union, name, .. } => format!(
                "{} {}",
                if *union { "union" } else { "struct" },
                name.as_deref().unwrap_or("<anon>")
            ),
            Type::Typedef { name, .. } => name.clone(),
            Type::Const(t) => format!("const {}", self.name_depth(*t, depth + 1)),
            Type::Volatile(t) => format!("volatile {}", self.name_depth(*t, depth + 1)),
            Type::Array { element, count } => match count {
                Some(n) => format!("{}[{n}]", self.name_depth(*element, depth + 1)),
                None => format!("{}[]", self.name_depth(*element, depth + 1)),
            },
            Type::Function => "void ()".into(),
            Type::Unknown => "?".into(),
        }
    }
}

/// An enum value as a reader wants it: the enumerator's name, for a flags enum the names of its
/// bits joined by `|` (with any unnamed rest in hex), or else the number.
pub fn format_enum(enumerators: &[(String, i64)], flags: bool, value: i64) -> String {
    if let Some((name, _)) = enumerators.iter().find(|(_, v)| *v == value) {
        return name.clone();
    }
    if !flags || value <= 0 {
        return value.to_string();
    }
    let mut rest = value;
    let mut names = Vec::new();
    for (name, bit) in enumerators {
        if *bit > 0 && rest & bit == *bit {
            names.push(name.as_str());
            rest &= !bit;
        }
    }
    let mut out = names.join("|");
    if rest != 0 || out.is_empty() {
        if !out.is_empty() {
            out.push('|');
        }
        out.push_str(&format!("{rest:#x}"));
    }
    out
}

/// An enum whose non-zero values are all distinct single bits (and there are at least two) is
/// most likely a set of flags: decode a value as `A|B` rather than as one name.
fn looks_like_flags(enumerators: &[(String, i64)]) -> bool {
    let nonzero: Vec<i64> = enumerators
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| *v != 0)
        .collect();
    nonzero.len() >= 2 && nonzero.iter().all(|v| *v > 0 && v.count_ones() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_char() -> Type {
        Type::Int {
            name: "char".into(),
            size: 1,
            signed: false,
            char: true,
        }
    }

    #[test]
    fn equal_types_share_an_id_and_absorb_remaps_children() {
        let mut a = TypeTable::default();
        let int = a.intern(Type::Int {
            name: "int".into(),
            size: 4,
            signed: true,
            char: false,
        });
        let p = a.intern(Type::Pointer(int));
        assert_eq!(a.intern(Type::Pointer(int)), p);

        let mut b = TypeTable::default();
        let ch = b.intern(plain_char());
        let c = b.intern(Type::Const(ch));
        let s = b.intern(Type::Pointer(c));
        let map = a.absorb(b);
        assert_eq!(a.value_kind(map[s.0 as usize]), ValueKind::Str);
        assert_eq!(a.name(map[s.0 as usize]), "const char *");
        assert_eq!(a.len(), 5);
        let mut c = TypeTable::default();
        let ch = c.intern(plain_char());
        let buf = c.intern(Type::Pointer(ch));
        let map = a.absorb(c);
        assert_eq!(a.value_kind(map[buf.0 as usize]), ValueKind::CharBuffer);
    }

    #[test]
    fn enum_values_read_as_names() {
        let e: Vec<(String, i64)> = [("NONE", 0), ("R", 1), ("W", 2), ("X", 4)]
            .iter()
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        assert_eq!(format_enum(&e, true, 2), "W");
        assert_eq!(format_enum(&e, true, 0), "NONE");
        assert_eq!(format_enum(&e, true, 5), "R|X");
        assert_eq!(format_enum(&e, true, 0x13), "R|W|0x10");
        assert_eq!(format_enum(&e, false, 5), "5");
        assert_eq!(format_enum(&e, true, -1), "-1");
    }

    #[test]
    fn flags_are_single_bits() {
        let e =
            |v: &[i64]| -> Vec<(String, i64)> { v.iter().map(|v| (format!("E{v}"), *v)).collect() };
        assert!(looks_like_flags(&e(&[0, 1, 2, 4])));
        assert!(!looks_like_flags(&e(&[0, 1, 2, 3])));
        assert!(!looks_like_flags(&e(&[1])));
    }
}

//! Interning tables for one packet sequence: each distinct string gets an iid once, and the
//! packet that first uses it carries its definition.

use std::collections::HashMap;

/// One interning table (event names, annotation names, categories or string values).
///
/// iids start at 1 because Perfetto reads iid 0 as "unset".
#[derive(Debug, Default)]
pub(crate) struct Interner {
    ids: HashMap<String, u64>,
    /// Past this many entries new strings are written inline: a trace of unique strings (file
    /// names, say) must not grow the table, and trace_processor's, without bound.
    capacity: Option<usize>,
}

/// What interning one string gave: its iid, and whether this is its first use (the caller then
/// emits the definition in the same packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interned {
    New(u64),
    Known(u64),
    /// The table is full: write the string inline.
    Inline,
}

impl Interner {
    pub(crate) fn with_capacity_limit(capacity: usize) -> Self {
        Interner {
            ids: HashMap::new(),
            capacity: Some(capacity),
        }
    }

    pub(crate) fn intern(&mut self, s: &str) -> Interned {
        if let Some(&iid) = self.ids.get(s) {
            return Interned::Known(iid);
        }
        if self.capacity.is_some_and(|cap| self.ids.len() >= cap) {
            return Interned::Inline;
        }
        let iid = self.ids.len() as u64 + 1;
        self.ids.insert(s.to_owned(), iid);
        Interned::New(iid)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iids_start_at_one_and_repeat() {
        let mut t = Interner::default();
        assert_eq!(t.intern("a"), Interned::New(1));
        assert_eq!(t.intern("b"), Interned::New(2));
        assert_eq!(t.intern("a"), Interned::Known(1));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_table_goes_inline_but_keeps_known_ones() {
        let mut t = Interner::with_capacity_limit(1);
        assert_eq!(t.intern("a"), Interned::New(1));
        assert_eq!(t.intern("b"), Interned::Inline);
        assert_eq!(t.intern("a"), Interned::Known(1));
    }
}

//! Assembling the index from the walkers' partial results and the ELF: one type table, functions
//! in address order, their `__fentry__` sites, and ABI locations where DWARF has none.

use std::collections::{BTreeMap, HashMap};

use crate::dwarf;
use crate::location::abi_registers;
use crate::model::{Function, Inlined, Layout, Location, SyscallParam, TypeId};
use crate::types::TypeTable;
use crate::Index;

impl Index {
    pub(crate) fn attach_fentry(&mut self) {
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
    pub(crate) fn fill_abi_locations(&mut self, unlocated: &[(u32, u16)]) {
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
}

/// Folds the walkers' partial results into one index: one type table, functions sorted by
/// entry, code the linker discarded dropped. Also returns the parameters DWARF gave no location
/// for, as (function, parameter) in the merged order.
pub(crate) fn merge(
    partials: Vec<dwarf::Partial>,
    code: &[(u64, u64)],
) -> (Index, Vec<(u32, u16)>) {
    let in_code = |a: u64| code.iter().any(|(lo, hi)| (*lo..*hi).contains(&a));
    let mut types = TypeTable::default();
    let mut units = Vec::new();
    let mut functions: Vec<Function> = Vec::new();
    let mut inlined = Vec::new();
    let mut layouts: HashMap<String, (usize, Layout)> = HashMap::new();
    let mut bad_units = 0;
    let mut unlocated = Vec::new();
    let mut syscalls: BTreeMap<String, Vec<SyscallParam>> = BTreeMap::new();
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
        for (name, params) in part.syscalls {
            syscalls.entry(name).or_insert_with(|| {
                params
                    .into_iter()
                    .map(|p| SyscallParam {
                        name: p.name,
                        ty: m(p.ty),
                    })
                    .collect()
            });
        }
        for (name, (ordinal, mut layout)) in part.layouts {
            if layouts.get(&name).is_some_and(|(o, _)| *o < ordinal) {
                continue;
            }
            for mb in &mut layout.members {
                mb.ty = m(mb.ty);
            }
            layouts.insert(name, (ordinal, layout));
        }
    }
    // A system call whose body was not inlined (`__do_sys_newfstatat` has code of its own) has
    // no abstract instance: its signature is its out-of-line body's.
    for f in &functions {
        if let Some(call) = f.name.strip_prefix("__do_sys_") {
            syscalls.entry(call.to_owned()).or_insert_with(|| {
                f.params
                    .iter()
                    .map(|p| SyscallParam {
                        name: p.name.clone(),
                        ty: p.ty,
                    })
                    .collect()
            });
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
        source_root: None,
        functions,
        inlined,
        types,
        layouts: layouts.into_iter().map(|(n, (_, l))| (n, l)).collect(),
        symbols: Vec::new(),
        fentry_sites: Vec::new(),
        return_sites: Vec::new(),
        syscalls,
        current_task: None,
        bad_units,
        dwarf: true,
        by_name: HashMap::new(),
        symbols_by_name: HashMap::new(),
        ranges: Vec::new(),
    };
    (index, unlocated)
}

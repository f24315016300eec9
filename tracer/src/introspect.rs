//! Introspection queries: struct members by path, the `task_struct` fields the tracer reads, and
//! where the current task pointer lives.

use crate::model::{CurrentTask, Layout, Member, Type, TypeId};
use crate::{Index, IndexError};

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

impl Index {
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

    pub(crate) fn find_current_task(&self, percpu: Option<(u64, u64)>) -> Option<CurrentTask> {
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

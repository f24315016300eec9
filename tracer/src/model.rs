//! The index's plain data: what a DWARF walk yields, serializable so a kernel's index is built once
//! and cached by the binary.

use serde::{Deserialize, Serialize};

/// A type in the index's type table. Equal types share one id across compilation units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TypeId(pub u32);

/// A function with code: one out-of-line instance, with where its arguments are at entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    /// The address a call lands on (where `call __fentry__` sits, after any `endbr64`).
    pub entry: u64,
    /// Every address range of the code, hot and cold parts alike.
    pub ranges: Vec<Range>,
    pub params: Vec<Param>,
    /// `None` for `void`.
    pub ret: Option<TypeId>,
    pub variadic: bool,
    /// Visible outside its compilation unit (`DW_AT_external`).
    pub external: bool,
    /// Index into [`crate::Index::units`]: the compilation unit, i.e. the source file path.
    pub unit: u32,
    /// The `call __fentry__` site, for functions ftrace can trace.
    pub fentry: Option<u64>,
}

/// A half-open address range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    /// `None` for an unnamed parameter.
    pub name: Option<String>,
    pub ty: TypeId,
    /// Where the value is when the function is entered.
    pub location: Location,
}

/// Where a parameter's value is at the function's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// In a register, as DWARF says.
    Reg(Reg),
    /// A 16-byte value in two registers (low half, high half).
    RegPair(Reg, Reg),
    /// In memory at `rsp + offset` as of entry (the return address is at `rsp + 0`).
    Stack(i64),
    /// The compiler knows the value in this copy of the function (a propagated constant, or the
    /// address of a global): it is not passed at all.
    Const(u64),
    /// DWARF gives no location at entry; the SysV ABI puts it in this register. Only given for
    /// functions whose signature the compiler kept (not `.isra`/`.constprop` clones).
    Abi(Reg),
    /// A DWARF expression this index does not reduce (raw bytes, for a full evaluator).
    Expr(Vec<u8>),
    /// Optimised out at entry, or passed in a way that cannot be read (a large struct by value).
    Unavailable,
}

/// An x86-64 general register, in DWARF's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reg {
    Rax,
    Rdx,
    Rcx,
    Rbx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

impl Reg {
    /// From a DWARF register number (x86-64 psABI, figure 3.36).
    pub fn from_dwarf(n: u16) -> Option<Reg> {
        use Reg::*;
        Some(match n {
            0 => Rax,
            1 => Rdx,
            2 => Rcx,
            3 => Rbx,
            4 => Rsi,
            5 => Rdi,
            6 => Rbp,
            7 => Rsp,
            8 => R8,
            9 => R9,
            10 => R10,
            11 => R11,
            12 => R12,
            13 => R13,
            14 => R14,
            15 => R15,
            _ => return None,
        })
    }

    /// The SysV integer argument registers, in order.
    pub const ARGS: [Reg; 6] = [Reg::Rdi, Reg::Rsi, Reg::Rdx, Reg::Rcx, Reg::R8, Reg::R9];

    pub fn name(self) -> &'static str {
        use Reg::*;
        match self {
            Rax => "rax",
            Rdx => "rdx",
            Rcx => "rcx",
            Rbx => "rbx",
            Rsi => "rsi",
            Rdi => "rdi",
            Rbp => "rbp",
            Rsp => "rsp",
            R8 => "r8",
            R9 => "r9",
            R10 => "r10",
            R11 => "r11",
            R12 => "r12",
            R13 => "r13",
            R14 => "r14",
            R15 => "r15",
        }
    }
}

/// One place where a function was inlined into another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inlined {
    pub name: String,
    /// Where the inlined body begins (`DW_AT_entry_pc`).
    pub entry: u64,
    /// Its code; empty when the compiler merged it entirely into the caller's instructions.
    pub ranges: Vec<Range>,
    /// Index into [`crate::Index::functions`] of the out-of-line function it sits in.
    pub caller: u32,
    pub call_line: Option<u32>,
}

/// A type as an argument decoder needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Type {
    Void,
    /// An integer; `char` says it is a character type (`char`, `signed char`, `unsigned char`).
    Int {
        name: String,
        size: u8,
        signed: bool,
        char: bool,
    },
    Bool {
        size: u8,
    },
    Float {
        name: String,
        size: u8,
    },
    Pointer(TypeId),
    Enum {
        name: Option<String>,
        size: u8,
        signed: bool,
        enumerators: Vec<(String, i64)>,
    },
    /// A struct or union. Named ones keep their members in [`crate::Index`]'s layout table (one
    /// layout per name); anonymous ones carry theirs here.
    Struct {
        union: bool,
        name: Option<String>,
        size: u64,
        members: Vec<Member>,
    },
    Typedef {
        name: String,
        target: TypeId,
    },
    Const(TypeId),
    Volatile(TypeId),
    Array {
        element: TypeId,
        count: Option<u64>,
    },
    /// A function type (what a function pointer points to).
    Function,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// `None` for an anonymous struct or union member, whose members read as the parent's.
    pub name: Option<String>,
    /// Byte offset in the enclosing struct.
    pub offset: u64,
    pub ty: TypeId,
    /// For a bit field: (bit offset from `offset`, bit size).
    pub bits: Option<(u16, u16)>,
}

/// A named struct's (or union's) layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub union: bool,
    pub size: u64,
    pub members: Vec<Member>,
}

/// An ELF symbol: the fallback name for code without DWARF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    pub name: String,
    pub address: u64,
    pub size: u64,
    pub kind: SymbolKind,
    pub global: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SymbolKind {
    Function,
    Object,
    Other,
}

/// Where the running task's `task_struct *` is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentTask {
    /// `current_task` (before 6.2 and from 6.15) or `pcpu_hot` (6.2 to 6.14).
    pub symbol: String,
    /// The pointer's address: `symbol`'s address plus the member offset in `pcpu_hot`.
    pub address: u64,
    /// On an SMP kernel the variable is per-CPU: read it at `GS.base + address`. On a UP
    /// kernel it is a plain variable at `address`.
    pub per_cpu: bool,
}

/// A system call parameter, from the `SYSCALL_DEFINE` body's DWARF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyscallParam {
    pub name: Option<String>,
    pub ty: TypeId,
}

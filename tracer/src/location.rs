//! DWARF location expressions reduced to where a parameter is at function entry.

use gimli::{Encoding, Expression, Operation, Reader};

use crate::model::{Location, Reg};

/// How the function's `DW_AT_frame_base` is computed, which decides what `DW_OP_fbreg` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameBase {
    /// `DW_OP_call_frame_cfa`: at entry the CFA is `rsp + 8` (the caller's `rsp` before the call).
    Cfa,
    Other,
}

/// The location one expression gives, evaluated at the function's entry.
pub(crate) fn at_entry<R: Reader>(
    expr: Expression<R>,
    encoding: Encoding,
    frame_base: FrameBase,
) -> Location {
    let raw = || expr.0.to_slice().map(|s| s.to_vec()).unwrap_or_default();
    let mut ops = Vec::new();
    let mut iter = expr.clone().operations(encoding);
    loop {
        match iter.next() {
            Ok(Some(op)) => ops.push(op),
            Ok(None) => break,
            Err(_) => return Location::Expr(raw()),
        }
        if ops.len() > 4 {
            return Location::Expr(raw());
        }
    }
    match ops.as_slice() {
        [Operation::Register { register }] => {
            reg(register.0).unwrap_or_else(|| Location::Expr(raw()))
        }
        [Operation::FrameOffset { offset }] if frame_base == FrameBase::Cfa => {
            Location::Stack(8 + offset)
        }
        // `rsp`-relative memory, read at entry.
        [Operation::RegisterOffset {
            register, offset, ..
        }] if register.0 == 7 => Location::Stack(*offset),
        // "The value the register had at entry": at entry, simply the register.
        [Operation::EntryValue { expression }, Operation::StackValue] => {
            let inner = Expression(expression.clone());
            match at_entry(inner, encoding, frame_base) {
                Location::Reg(r) => Location::Reg(r),
                _ => Location::Expr(raw()),
            }
        }
        // A value the compiler knows (a propagated constant or a global's address).
        [Operation::UnsignedConstant { value }, Operation::StackValue]
        | [Operation::Address { address: value }, Operation::StackValue] => Location::Const(*value),
        [Operation::SignedConstant { value }, Operation::StackValue] => {
            Location::Const(*value as u64)
        }
        // A 16-byte value split over two registers, low half first.
        [Operation::Register { register: lo }, Operation::Piece {
            size_in_bits: 64, ..
        }, Operation::Register { register: hi }, Operation::Piece {
            size_in_bits: 64, ..
        }] => match (Reg::from_dwarf(lo.0), Reg::from_dwarf(hi.0)) {
            (Some(lo), Some(hi)) => Location::RegPair(lo, hi),
            _ => Location::Expr(raw()),
        },
        // The first 8 bytes of a larger value, the rest optimised away: the register holds them.
        [Operation::Register { register }, Operation::Piece {
            size_in_bits: 64, ..
        }] => reg(register.0).unwrap_or_else(|| Location::Expr(raw())),
        // Only the caller knows the value (GNU_parameter_ref): nothing to read here.
        [Operation::ParameterRef { .. }, ..] => Location::Unavailable,
        [] => Location::Unavailable,
        _ => Location::Expr(raw()),
    }
}

fn reg(n: u16) -> Option<Location> {
    Reg::from_dwarf(n).map(Location::Reg)
}

/// SysV x86-64 argument passing, for parameters DWARF gives no location for at entry: integer
/// class values of up to 8 bytes take the next register, 9 to 16 bytes take two, larger ones go
/// on the stack. (The kernel passes no floating point.) `sizes` are the parameters' sizes in
/// order; `None` means unknown, which stops the assignment.
pub(crate) fn abi_registers(sizes: &[Option<u64>]) -> Vec<Location> {
    let mut next = 0usize;
    let mut stack = 8i64;
    let mut out = Vec::with_capacity(sizes.len());
    let mut lost = false;
    for size in sizes {
        let loc = match size {
            _ if lost => Location::Unavailable,
            None => {
                lost = true;
                Location::Unavailable
            }
            Some(n) if *n <= 8 && next < 6 => {
                next += 1;
                Location::Abi(Reg::ARGS[next - 1])
            }
            // A two-register value: the decoder gets the first half's register.
            Some(n) if *n <= 16 && next + 2 <= 6 => {
                next += 2;
                Location::Abi(Reg::ARGS[next - 2])
            }
            Some(n) => {
                let at = stack;
                stack += (*n as i64 + 7) & !7;
                Location::Stack(at)
            }
        };
        out.push(loc);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gimli::{EndianSlice, LittleEndian};

    fn enc() -> Encoding {
        Encoding {
            format: gimli::Format::Dwarf32,
            version: 5,
            address_size: 8,
        }
    }

    fn loc(bytes: &[u8]) -> Location {
        at_entry(
            Expression(EndianSlice::new(bytes, LittleEndian)),
            enc(),
            FrameBase::Cfa,
        )
    }

    #[test]
    fn registers_stack_and_entry_values() {
        assert_eq!(loc(&[0x55]), Location::Reg(Reg::Rdi)); // DW_OP_reg5
        assert_eq!(loc(&[0x54]), Location::Reg(Reg::Rsi)); // DW_OP_reg4
        assert_eq!(loc(&[0x91, 0x00]), Location::Stack(8)); // DW_OP_fbreg 0
        assert_eq!(loc(&[0x77, 0x10]), Location::Stack(16)); // DW_OP_breg7 16
                                                             // DW_OP_entry_value(1: DW_OP_reg1) DW_OP_stack_value
        assert_eq!(loc(&[0xa3, 0x01, 0x51, 0x9f]), Location::Reg(Reg::Rdx));
        // DW_OP_lit1 DW_OP_stack_value: a constant.
        assert_eq!(loc(&[0x31, 0x9f]), Location::Const(1));
        // DW_OP_addr <8 bytes> DW_OP_stack_value: a global's address.
        let mut addr = vec![0x03];
        addr.extend_from_slice(&0xffff_ffff_8150_8000u64.to_le_bytes());
        addr.push(0x9f);
        assert_eq!(loc(&addr), Location::Const(0xffff_ffff_8150_8000));
        // DW_OP_reg5 DW_OP_piece 8 DW_OP_reg4 DW_OP_piece 8: rdi:rsi.
        assert_eq!(
            loc(&[0x55, 0x93, 0x08, 0x54, 0x93, 0x08]),
            Location::RegPair(Reg::Rdi, Reg::Rsi)
        );
        assert_eq!(loc(&[0x55, 0x93, 0x08]), Location::Reg(Reg::Rdi));
        // DW_OP_reg5 DW_OP_plus_uconst 1 (nonsense): kept raw for a full evaluator.
        assert_eq!(
            loc(&[0x55, 0x23, 0x01]),
            Location::Expr(vec![0x55, 0x23, 0x01])
        );
    }

    #[test]
    fn sysv_assigns_registers_in_order_and_spills() {
        let l = abi_registers(&[
            Some(8),
            Some(16),
            Some(4),
            Some(32),
            Some(1),
            Some(8),
            Some(8),
        ]);
        assert_eq!(l[0], Location::Abi(Reg::Rdi));
        assert_eq!(l[1], Location::Abi(Reg::Rsi)); // rsi:rdx
        assert_eq!(l[2], Location::Abi(Reg::Rcx));
        assert_eq!(l[3], Location::Stack(8));
        assert_eq!(l[4], Location::Abi(Reg::R8));
        assert_eq!(l[5], Location::Abi(Reg::R9));
        assert_eq!(l[6], Location::Stack(40));
    }
}

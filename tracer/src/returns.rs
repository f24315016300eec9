//! Where traced functions return: every `ret` in a function that has a `__fentry__` site, found
//! by decoding its code. The trace pass plants a breakpoint on each and reads the return value
//! from `rax` there. A kernel built with return thunks returns through `jmp __x86_return_thunk`
//! instead (which boot code may rewrite into `ret`); those jumps are return sites too.
//!
//! Only code in the kernel's permanent text (`_stext`.. `_etext`) is listed: init text is freed
//! after boot and its pages reused, so a breakpoint there would corrupt data.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};

use crate::model::Function;

/// How a return site leaves its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReturnKind {
    /// `ret` (`c3`).
    Ret,
    /// `jmp __x86_return_thunk`: returns as `ret` does.
    Thunk,
}

/// One return site: the instruction's address, how it returns, and the function it returns
/// from (an index into `Index::functions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReturnSite {
    pub address: u64,
    pub kind: ReturnKind,
    pub function: u32,
}

/// Decodes each traceable function inside `text` and lists its return sites, sorted by address.
/// `code(addr, len)` gives the bytes of the ELF at a virtual address.
pub(crate) fn return_sites<'a>(
    functions: &[Function],
    text: (u64, u64),
    thunk: Option<u64>,
    code: impl Fn(u64, u64) -> Option<&'a [u8]>,
) -> Vec<ReturnSite> {
    let mut sites = Vec::new();
    let mut instr = Instruction::default();
    for (index, f) in functions.iter().enumerate() {
        if f.fentry.is_none() {
            continue;
        }
        for range in &f.ranges {
            if range.start < text.0 || range.end > text.1 || range.end <= range.start {
                continue;
            }
            let Some(bytes) = code(range.start, range.end - range.start) else {
                continue;
            };
            let mut decoder = Decoder::with_ip(64, bytes, range.start, DecoderOptions::NONE);
            while decoder.can_decode() {
                decoder.decode_out(&mut instr);
                let kind = match instr.code() {
                    Code::Retnq => Some(ReturnKind::Ret),
                    Code::Jmp_rel32_64 if Some(instr.near_branch_target()) == thunk => {
                        Some(ReturnKind::Thunk)
                    }
                    _ => None,
                };
                if let Some(kind) = kind {
                    sites.push(ReturnSite {
                        address: instr.ip(),
                        kind,
                        function: index as u32,
                    });
                }
            }
        }
    }
    sites.sort_by_key(|s| s.address);
    sites.dedup_by_key(|s| s.address);
    sites
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Function, Range};

    fn function(entry: u64, len: u64) -> Function {
        Function {
            name: "f".into(),
            entry,
            ranges: vec![Range {
                start: entry,
                end: entry + len,
            }],
            params: Vec::new(),
            ret: None,
            variadic: false,
            external: true,
            unit: 0,
            fentry: Some(entry),
        }
    }

    #[test]
    fn rets_and_thunk_jumps_are_found_and_c3_inside_an_instruction_is_not() {
        // nop5 (the fentry site); mov eax, 0xc3 (a c3 byte inside); ret; jmp thunk; int3
        let base = 0x1000u64;
        let mut code = vec![0x0f, 0x1f, 0x44, 0x00, 0x00, 0xb8, 0xc3, 0, 0, 0, 0xc3];
        let jmp_at = base + code.len() as u64;
        let thunk = 0x2000u64;
        let rel = (thunk as i64 - (jmp_at as i64 + 5)) as i32;
        code.push(0xe9);
        code.extend_from_slice(&rel.to_le_bytes());
        code.push(0xcc);
        let functions = vec![function(base, code.len() as u64)];
        let sites = return_sites(&functions, (0, u64::MAX), Some(thunk), |addr, len| {
            code.get((addr - base) as usize..(addr - base + len) as usize)
        });
        assert_eq!(
            sites,
            vec![
                ReturnSite {
                    address: base + 10,
                    kind: ReturnKind::Ret,
                    function: 0
                },
                ReturnSite {
                    address: jmp_at,
                    kind: ReturnKind::Thunk,
                    function: 0
                },
            ]
        );
    }

    #[test]
    fn functions_outside_the_permanent_text_are_skipped() {
        let code = [0xc3u8];
        let functions = vec![function(0x1000, 1)];
        let sites = return_sites(&functions, (0x2000, 0x3000), None, |_, _| Some(&code[..]));
        assert!(sites.is_empty());
    }
}

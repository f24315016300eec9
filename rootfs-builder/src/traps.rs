//! The stimulus's time and entropy instructions: found in the linked binary, and `rdrand`/`rdseed`
//! rewritten into traps (DESIGN.md, "Determinism without a PMU", 4).
//!
//! A KVM VMM cannot intercept `rdtsc`/`rdtscp`, nor, on AMD, `rdrand`/`rdseed`. The first two
//! are left in place: the stimulus runtime (`guest/agent/traps.c`) makes them fault with
//! `PR_SET_TSC` and answers them from virtual time, so they are only reported here. The other two
//! cannot be made to fault, so every one is rewritten: its `0F C7` opcode becomes `0F B9` (`ud1`,
//! which raises #UD), prefixes and ModRM kept, so the runtime's SIGILL handler can read the
//! destination register (ModRM rm and REX.B), the operand size (66, REX.W) and which of the two
//! it was (ModRM reg: 6 `rdrand`, 7 `rdseed`) from the bytes at the faulting address.
//!
//! Why `ud1` and not `ud2` + ModRM: glibc's static code has `ud2` traps followed by `F3`
//! prefixes (`ud2; movdqu`), and `F3` read as a ModRM is "reg 6, register form", which the
//! handler would take for a rewritten `rdrand`. A genuine `ud1` with a register operand whose
//! reg field is 6 or 7 is something compilers do not emit; if one is there anyway, the build
//! is refused (the handler would emulate it instead of letting it trap).
//!
//! The scan is a linear sweep of every executable section with `iced-x86`; gcc puts no data in
//! code on x86, so every instruction is found.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic};
use object::{Object, ObjectSection};

/// The opcode byte after `0F` of `rdrand`/`rdseed` (group 9).
const GROUP9: u8 = 0xc7;
/// The opcode byte after `0F` of the trap rrr writes instead (`ud1`); `traps.c`'s
/// `RRR_MARKER_OPCODE`.
pub const MARKER_OPCODE: u8 = 0xb9;
/// Longest x86 instruction: no prefix run is followed past it.
const MAX_INSTRUCTION: usize = 15;

/// One of the four instructions, where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    pub address: u64,
    pub kind: SiteKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    Rdtsc,
    Rdtscp,
    Rdrand,
    Rdseed,
}

impl SiteKind {
    pub fn name(self) -> &'static str {
        match self {
            SiteKind::Rdtsc => "rdtsc",
            SiteKind::Rdtscp => "rdtscp",
            SiteKind::Rdrand => "rdrand",
            SiteKind::Rdseed => "rdseed",
        }
    }
}

/// What the scan found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrapReport {
    /// `rdtsc`/`rdtscp`: left in place, trapped at run time.
    pub trapped: Vec<Site>,
    /// `rdrand`/`rdseed`: rewritten into `ud1` markers.
    pub rewritten: Vec<Site>,
}

impl TrapReport {
    /// One line for the user when something was rewritten (nothing otherwise: `rdtsc` is in
    /// glibc's mutexes, so nearly every stimulus has some).
    pub fn note(&self) -> Option<String> {
        if self.rewritten.is_empty() {
            return None;
        }
        let shown: Vec<String> = self
            .rewritten
            .iter()
            .take(4)
            .map(|site| format!("{} at {:#x}", site.kind.name(), site.address))
            .collect();
        let more = match self.rewritten.len().saturating_sub(shown.len()) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Some(format!(
            "rrr: rewrote {} rdrand/rdseed instruction(s) into traps the VMM answers ({}{more})",
            self.rewritten.len(),
            shown.join(", ")
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrapError {
    #[error("cannot read the linked stimulus as an x86 ELF file: {0}")]
    Elf(String),
    #[error(
        "cannot rewrite `{instruction}` at {address:#x}{place} ({bytes}) into a trap: rrr \
         rewrites only the register forms with operand-size, address-size and segment \
         prefixes; change the code to use getrandom() instead"
    )]
    Unrewritable {
        instruction: &'static str,
        address: u64,
        /// " in SYMBOL+OFFSET" where the symbol table says, else empty.
        place: String,
        bytes: String,
    },
    #[error(
        "the instruction at {address:#x}{place} ({bytes}) is a `ud1` of the form rrr gives a \
         rewritten rdrand/rdseed (a register ModRM with reg field 6 or 7): its SIGILL handler \
         would emulate it instead of letting it trap; remove it from the stimulus"
    )]
    MarkerCollision {
        address: u64,
        place: String,
        bytes: String,
    },
}

impl TrapError {
    /// Names the function the address is in, from the binary's symbol table.
    fn locate(mut self, elf: &[u8]) -> Self {
        if let TrapError::Unrewritable { address, place, .. }
        | TrapError::MarkerCollision { address, place, .. } = &mut self
        {
            *place = symbol_of(elf, *address)
                .map(|(name, offset)| format!(" in {name}+{offset:#x}"))
                .unwrap_or_default();
        }
        self
    }
}

/// The function symbol holding `address`, and how far into it the address is.
fn symbol_of(elf: &[u8], address: u64) -> Option<(String, u64)> {
    use object::ObjectSymbol;
    let file = object::File::parse(elf).ok()?;
    file.symbols()
        .filter(|symbol| symbol.kind() == object::SymbolKind::Text)
        .find(|symbol| {
            (symbol.address()..symbol.address().saturating_add(symbol.size().max(1)))
                .contains(&address)
        })
        .and_then(|symbol| Some((symbol.name().ok()?.to_owned(), address - symbol.address())))
}

/// A trap site as the runtime's `rrr_marker()` recognizes it, or the `rdrand`/`rdseed` it was
/// made from (`opcode` [`GROUP9`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Form {
    /// The whole instruction's length.
    len: usize,
    /// Where the byte after `0F` is.
    opcode_at: usize,
    /// 6 (`rdrand`) or 7 (`rdseed`).
    reg: u8,
    /// Operand size in bytes: 2, 4 or 8.
    size: u8,
}

/// Parses prefixes (66, 67, segments), then in 64-bit code an optional REX, then `0F opcode` and a
/// register ModRM whose reg field is 6 or 7. Mirrors `rrr_marker()` in `guest/agent/traps.c`.
fn parse_form(code: &[u8], opcode: u8, bitness: u32) -> Option<Form> {
    let mut i = 0;
    let mut size = 4;
    loop {
        match *code.get(i)? {
            0x66 => size = 2,
            0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            _ => break,
        }
        i += 1;
        if i >= MAX_INSTRUCTION - 2 {
            return None;
        }
    }
    let mut rex = 0;
    if bitness == 64 && code[i] & 0xf0 == 0x40 {
        rex = code[i];
        i += 1;
    }
    if *code.get(i)? != 0x0f || *code.get(i + 1)? != opcode {
        return None;
    }
    let modrm = *code.get(i + 2)?;
    let reg = (modrm >> 3) & 7;
    if modrm >> 6 != 3 || reg < 6 {
        return None;
    }
    if rex & 0x08 != 0 {
        size = 8;
    }
    Some(Form {
        len: i + 3,
        opcode_at: i + 1,
        reg,
        size,
    })
}

/// Scans every executable section of the ELF image `elf`, rewrites its `rdrand`/`rdseed` in
/// place, and reports what it found. On an error nothing needs undoing: the caller discards the
/// image.
pub fn rewrite_elf(elf: &mut [u8]) -> Result<TrapReport, TrapError> {
    let (bitness, sections) = executable_sections(elf)?;
    let mut report = TrapReport::default();
    for (address, offset, size) in sections {
        let code = elf
            .get_mut(offset..offset.saturating_add(size))
            .ok_or_else(|| TrapError::Elf(format!("section at {address:#x} lies past the end")))?;
        if let Err(error) = rewrite_code(code, address, bitness, &mut report) {
            return Err(error.locate(elf));
        }
    }
    Ok(report)
}

/// (bitness, [(address, file offset, size)]) of the executable sections.
#[allow(clippy::type_complexity)]
fn executable_sections(elf: &[u8]) -> Result<(u32, Vec<(u64, usize, usize)>), TrapError> {
    let file = object::File::parse(elf).map_err(|e| TrapError::Elf(e.to_string()))?;
    let bitness = match file.architecture() {
        object::Architecture::X86_64 => 64,
        object::Architecture::I386 => 32,
        other => return Err(TrapError::Elf(format!("not x86 but {other:?}"))),
    };
    let mut sections = Vec::new();
    for section in file.sections() {
        if section.kind() != object::SectionKind::Text {
            continue;
        }
        let Some((offset, size)) = section.file_range() else {
            continue;
        };
        let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Err(TrapError::Elf("a section too large for memory".into()));
        };
        sections.push((section.address(), offset, size));
    }
    Ok((bitness, sections))
}

/// Scans one run of code loaded at `address` and rewrites it in place.
fn rewrite_code(
    code: &mut [u8],
    address: u64,
    bitness: u32,
    report: &mut TrapReport,
) -> Result<(), TrapError> {
    let mut to_patch = Vec::new();
    let mut decoder = Decoder::with_ip(bitness, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let at = (instruction.ip() - address) as usize;
        let bytes = &code[at..at + instruction.len()];
        let kind = match instruction.mnemonic() {
            Mnemonic::Rdtsc => SiteKind::Rdtsc,
            Mnemonic::Rdtscp => SiteKind::Rdtscp,
            Mnemonic::Rdrand => SiteKind::Rdrand,
            Mnemonic::Rdseed => SiteKind::Rdseed,
            _ => {
                if parse_form(bytes, MARKER_OPCODE, bitness).is_some() {
                    return Err(TrapError::MarkerCollision {
                        address: instruction.ip(),
                        place: String::new(),
                        bytes: hex(bytes),
                    });
                }
                continue;
            }
        };
        let site = Site {
            address: instruction.ip(),
            kind,
        };
        if matches!(kind, SiteKind::Rdtsc | SiteKind::Rdtscp) {
            report.trapped.push(site);
            continue;
        }
        let form = parse_form(bytes, GROUP9, bitness)
            .filter(|form| form.len == bytes.len() && form_matches(form, instruction.code()))
            .ok_or_else(|| TrapError::Unrewritable {
                instruction: kind.name(),
                address: instruction.ip(),
                place: String::new(),
                bytes: hex(bytes),
            })?;
        to_patch.push(at + form.opcode_at);
        report.rewritten.push(site);
    }
    for at in to_patch {
        code[at] = MARKER_OPCODE;
    }
    Ok(())
}

/// The bytes say what iced decoded: the same instruction and operand size, so the runtime
/// emulates exactly what was there.
fn form_matches(form: &Form, code: Code) -> bool {
    let expected = match code {
        Code::Rdrand_r16 => (6, 2),
        Code::Rdrand_r32 => (6, 4),
        Code::Rdrand_r64 => (6, 8),
        Code::Rdseed_r16 => (7, 2),
        Code::Rdseed_r32 => (7, 4),
        Code::Rdseed_r64 => (7, 8),
        _ => return false,
    };
    (form.reg, form.size) == expected
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x401000;

    fn scan(code: &[u8], bitness: u32) -> (Vec<u8>, Result<TrapReport, TrapError>) {
        let mut code = code.to_vec();
        let mut report = TrapReport::default();
        let result = rewrite_code(&mut code, BASE, bitness, &mut report).map(|()| report);
        (code, result)
    }

    fn site(offset: u64, kind: SiteKind) -> Site {
        Site {
            address: BASE + offset,
            kind,
        }
    }

    #[test]
    fn rdrand_and_rdseed_of_every_size_become_ud1_with_prefixes_and_modrm_kept() {
        let code = [
            0x0f, 0xc7, 0xf0, // rdrand eax
            0x66, 0x0f, 0xc7, 0xf1, // rdrand cx
            0x48, 0x0f, 0xc7, 0xf2, // rdrand rdx
            0x49, 0x0f, 0xc7, 0xf8, // rdseed r8
            0x0f, 0xc7, 0xfb, // rdseed ebx
            0x90, // nop
        ];
        let (patched, report) = scan(&code, 64);
        let report = report.unwrap();
        assert_eq!(
            patched,
            [
                0x0f, 0xb9, 0xf0, 0x66, 0x0f, 0xb9, 0xf1, 0x48, 0x0f, 0xb9, 0xf2, 0x49, 0x0f, 0xb9,
                0xf8, 0x0f, 0xb9, 0xfb, 0x90
            ]
        );
        assert_eq!(
            report.rewritten,
            [
                site(0, SiteKind::Rdrand),
                site(3, SiteKind::Rdrand),
                site(7, SiteKind::Rdrand),
                site(11, SiteKind::Rdseed),
                site(15, SiteKind::Rdseed),
            ]
        );
        assert!(report.trapped.is_empty());
        let note = report.note().unwrap();
        assert!(note.contains("rewrote 5"), "{note}");
        assert!(note.contains("rdseed at 0x40100b"), "{note}");
        assert!(note.contains("and 1 more"), "{note}");
    }

    #[test]
    fn the_rewritten_bytes_parse_as_the_runtime_parses_them() {
        // What traps.c's rrr_marker() reads back: destination, size and kind.
        let (patched, _) = scan(&[0x49, 0x0f, 0xc7, 0xf8], 64);
        let form = parse_form(&patched, MARKER_OPCODE, 64).unwrap();
        assert_eq!(
            (
                form.len,
                form.reg,
                form.size,
                patched[3] & 7 | (patched[0] & 1) << 3
            ),
            (4, 7, 8, 8)
        );
        let (patched, _) = scan(&[0x66, 0x0f, 0xc7, 0xf3], 32);
        let form = parse_form(&patched, MARKER_OPCODE, 32).unwrap();
        assert_eq!((form.len, form.reg, form.size), (4, 6, 2));
    }

    #[test]
    fn rdtsc_and_rdtscp_are_reported_and_left_alone() {
        let code = [0x0f, 0x31, 0x0f, 0x01, 0xf9, 0xc3];
        let (patched, report) = scan(&code, 64);
        let report = report.unwrap();
        assert_eq!(patched, code);
        assert_eq!(
            report.trapped,
            [site(0, SiteKind::Rdtsc), site(2, SiteKind::Rdtscp)]
        );
        assert_eq!(report.note(), None);
    }

    #[test]
    fn a_genuine_ud1_that_looks_like_a_marker_is_refused_with_its_address() {
        let code = [0x90, 0x0f, 0xb9, 0xf0, 0x0f, 0xc7, 0xf0];
        let (_, result) = scan(&code, 64);
        let err = result.unwrap_err();
        assert_eq!(
            err,
            TrapError::MarkerCollision {
                address: BASE + 1,
                place: String::new(),
                bytes: "0f b9 f0".into()
            }
        );
        assert!(err.to_string().contains("0x401001"), "{err}");
    }

    #[test]
    fn ud2_and_ud1_of_other_forms_are_fine() {
        // ud2 followed by an F3 prefix (glibc has this), ud1 with reg 0 and with a memory operand.
        let code = [
            0x0f, 0x0b, 0xf3, 0x0f, 0x6f, 0x2e, 0x0f, 0xb9, 0xc0, 0x0f, 0xb9, 0x70, 0x10,
        ];
        let (patched, report) = scan(&code, 64);
        assert_eq!(patched, code);
        assert_eq!(report.unwrap(), TrapReport::default());
    }

    #[test]
    fn forms_that_cannot_be_rewritten_are_refused_with_instruction_and_address() {
        // A REX before an operand-size prefix is ignored by the CPU; rrr's marker does not
        // carry that, so it refuses rather than guess.
        let code = [0x90, 0x90, 0x48, 0x66, 0x0f, 0xc7, 0xf0];
        let (_, result) = scan(&code, 64);
        let err = result.unwrap_err();
        match &err {
            TrapError::Unrewritable {
                instruction,
                address,
                ..
            } => {
                assert_eq!((*instruction, *address), ("rdrand", BASE + 2));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("`rdrand` at 0x401002"), "{err}");
    }

    #[test]
    fn in_32_bit_code_0x4x_is_an_instruction_not_a_rex() {
        // inc eax; rdrand eax
        let (patched, report) = scan(&[0x40, 0x0f, 0xc7, 0xf0], 32);
        assert_eq!(patched, [0x40, 0x0f, 0xb9, 0xf0]);
        assert_eq!(report.unwrap().rewritten, [site(1, SiteKind::Rdrand)]);
    }

    #[test]
    fn a_non_elf_file_is_a_clear_error() {
        let err = rewrite_elf(&mut b"#!/bin/sh\n".to_vec()).unwrap_err();
        assert!(matches!(err, TrapError::Elf(_)), "{err}");
    }
}

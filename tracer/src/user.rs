//! The stimulus as a user-space image: its functions (ELF symbols) and source lines (its DWARF
//! line table, it is built with `-g`), so that an address in it, such as the place a system call
//! was made from, can be named `main+0x1c (repro.c:14)`.
//!
//! The stimulus is a static PIE: the kernel loads it at a random bias, and records where in the
//! task's `mm_struct` (`start_code`, `end_code`). [`UserImage::code_range`] is what the kernel's
//! ELF loader computes from the program headers before the bias, so the bias is
//! `start_code - code_range().start`, and a task runs this image when its code range has the
//! same length.

use std::ops::Range;
use std::path::Path;

use gimli::{EndianSlice, LittleEndian};
use object::{Object, ObjectSection, ObjectSegment, SegmentFlags};

use crate::IndexError;

/// A function of the image, by its unbiased address.
#[derive(Debug, Clone)]
struct Function {
    start: u64,
    size: u64,
    name: String,
}

/// One row of the line table: from `address` on (until the next row), `file:line`; an
/// `end` row closes a sequence.
#[derive(Debug, Clone, Copy)]
struct LineRow {
    address: u64,
    file: u32,
    line: u32,
    end: bool,
}

#[derive(Debug, Clone)]
pub struct UserImage {
    /// A 32-bit image: its pointers are the low halves of the registers.
    is_32: bool,
    code: Range<u64>,
    functions: Vec<Function>,
    rows: Vec<LineRow>,
    files: Vec<String>,
}

impl UserImage {
    /// Reads an ELF image from memory (`what` names it in errors).
    pub fn parse(bytes: &[u8], what: &Path) -> Result<UserImage, IndexError> {
        let file = object::File::parse(bytes).map_err(|source| IndexError::Elf {
            path: what.to_owned(),
            source,
        })?;
        let (mut start, mut end) = (u64::MAX, 0);
        for segment in file.segments() {
            let executable = match segment.flags() {
                SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => false,
            };
            if executable {
                let (_, filesz) = segment.file_range();
                start = start.min(segment.address());
                end = end.max(segment.address() + filesz);
            }
        }
        let code = if start < end { start..end } else { 0..0 };
        let mut functions: Vec<Function> = crate::elf::symbols(&file)
            .into_iter()
            .filter(|s| s.kind == crate::model::SymbolKind::Function && s.address != 0)
            .map(|s| Function {
                start: s.address,
                size: s.size,
                name: s.name,
            })
            .collect();
        functions.sort_by_key(|f| f.start);
        let (rows, files) = line_table(&file)?;
        Ok(UserImage {
            is_32: !file.is_64(),
            code,
            functions,
            rows,
            files,
        })
    }

    pub fn is_32(&self) -> bool {
        self.is_32
    }

    /// A function symbol's address (before the bias).
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.functions
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.start)
    }

    /// The function that starts at `address` (before the bias): its number and name.
    pub fn function_at(&self, address: u64) -> Option<(u32, &str)> {
        let i = self.functions.partition_point(|f| f.start < address);
        let f = self.functions.get(i).filter(|f| f.start == address)?;
        Some((i as u32, f.name.as_str()))
    }

    /// The name of function number `index` (from [`UserImage::function_at`]).
    pub fn function_name(&self, index: u32) -> &str {
        self.functions
            .get(index as usize)
            .map_or("?", |f| f.name.as_str())
    }

    /// The code range the kernel's ELF loader records (`start_code..end_code`), unbiased.
    pub fn code_range(&self) -> Range<u64> {
        self.code.clone()
    }

    /// Names an unbiased address: the function it is in with the offset, and the source line
    /// when the line table has one. `None` outside every known function.
    pub fn describe(&self, address: u64) -> Option<String> {
        let i = self.functions.partition_point(|f| f.start <= address);
        let f = &self.functions[i.checked_sub(1)?];
        if f.size != 0 && address >= f.start + f.size {
            return None;
        }
        let mut text = if address == f.start {
            f.name.clone()
        } else {
            format!("{}+{:#x}", f.name, address - f.start)
        };
        if let Some((file, line)) = self.line(address) {
            text.push_str(&format!(" ({file}:{line})"));
        }
        Some(text)
    }

    /// Names a return address found on the user stack: the function and offset of the return
    /// address, with the line of the call before it. `None` unless the call was in code that
    /// has source lines (the program's own code, not the C library's).
    pub fn describe_return(&self, address: u64) -> Option<String> {
        let (file, line) = self.line(address.checked_sub(1)?)?;
        let i = self.functions.partition_point(|f| f.start < address);
        let f = &self.functions[i.checked_sub(1)?];
        if f.size != 0 && address > f.start + f.size {
            return None;
        }
        Some(format!(
            "{}+{:#x} ({file}:{line})",
            f.name,
            address - f.start
        ))
    }

    /// Whether an unbiased address has a source line (the program's own code).
    pub fn has_source(&self, address: u64) -> bool {
        self.line(address).is_some()
    }

    /// The source file (its last path component) and line of an unbiased address.
    pub fn line(&self, address: u64) -> Option<(&str, u32)> {
        let i = self.rows.partition_point(|r| r.address <= address);
        let row = self.rows[i.checked_sub(1)?];
        if row.end || row.line == 0 {
            return None;
        }
        let path = self.files.get(row.file as usize)?;
        let name = path.rsplit('/').next().unwrap_or(path);
        Some((name, row.line))
    }
}

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Every row of every unit's line program, sorted by address, with the files they name.
fn line_table<'a>(
    file: &object::File<'a, &'a [u8]>,
) -> Result<(Vec<LineRow>, Vec<String>), IndexError> {
    let dwarf = gimli::Dwarf::load(|id| -> Result<R<'a>, IndexError> {
        let data = file
            .section_by_name(id.name())
            .and_then(|s| s.data().ok())
            .unwrap_or(&[]);
        Ok(EndianSlice::new(data, LittleEndian))
    })?;
    let mut rows = Vec::new();
    let mut files: Vec<String> = Vec::new();
    let mut file_ids = std::collections::HashMap::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let Some(program) = unit.line_program.clone() else {
            continue;
        };
        let mut program_rows = program.rows();
        while let Some((header, row)) = program_rows.next_row()? {
            let file_id = match row.file(header) {
                Some(entry) => {
                    let mut path = String::new();
                    if let Some(dir) = entry.directory(header) {
                        let dir = dwarf.attr_string(&unit, dir)?;
                        path.push_str(&dir.to_string_lossy());
                        path.push('/');
                    }
                    let name = dwarf.attr_string(&unit, entry.path_name())?;
                    path.push_str(&name.to_string_lossy());
                    *file_ids.entry(path.clone()).or_insert_with(|| {
                        files.push(path);
                        files.len() as u32 - 1
                    })
                }
                None => u32::MAX,
            };
            rows.push(LineRow {
                address: row.address(),
                file: file_id,
                line: row.line().map_or(0, |l| l.get() as u32),
                end: row.end_sequence(),
            });
        }
    }
    // At one address, a sequence's start wins over another's end.
    rows.sort_by_key(|r| (r.address, !r.end));
    Ok((rows, files))
}

#[cfg(test)]
mod tests {
    use super::UserImage;
    use std::path::Path;
    use std::process::Command;

    /// A real static PIE built the way stimuli are: its `main` is named with its source line,
    /// and the code range is what the kernel will record.
    #[test]
    fn names_a_static_pie_address_with_function_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("prog.c");
        std::fs::write(
            &src,
            "#include <unistd.h>\nint helper(int x) { return write(1, \"x\", x); }\nint main(void)\n{\n  return helper(1);\n}\n",
        )
        .unwrap();
        let bin = dir.path().join("prog");
        let status = Command::new("gcc")
            .args(["-O0", "-g", "-static-pie", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .expect("gcc is needed (scripts/setup installs it)");
        assert!(status.success());
        let bytes = std::fs::read(&bin).unwrap();
        let image = UserImage::parse(&bytes, Path::new("prog")).unwrap();
        let code = image.code_range();
        assert!(code.start < code.end, "{code:?}");
        let object = object::File::parse(&*bytes).unwrap();
        use object::{Object, ObjectSymbol};
        let main = object
            .symbols()
            .find(|s| s.name() == Ok("main"))
            .expect("main")
            .address();
        assert!(code.contains(&main));
        assert_eq!(image.describe(main).unwrap(), "main (prog.c:4)");
        let inside = image.describe(main + 4).unwrap();
        assert!(inside.starts_with("main+0x4 (prog.c:"), "{inside}");
        let helper = object
            .symbols()
            .find(|s| s.name() == Ok("helper"))
            .unwrap()
            .address();
        assert_eq!(image.describe(helper).unwrap(), "helper (prog.c:2)");
        assert_eq!(image.describe(0), None);
        let (index, name) = image.function_at(helper).unwrap();
        assert_eq!((name, image.function_name(index)), ("helper", "helper"));
        assert_eq!(image.function_at(helper + 1), None);
        assert_eq!(image.symbol("main"), Some(main));
        assert!(!image.is_32());
        // A return address into main: named by the line of the call before it.
        let ret = image.describe_return(main + 8).unwrap();
        assert!(ret.starts_with("main+0x8 (prog.c:"), "{ret}");
        assert!(image.has_source(helper));
        // The C library has no lines: its code is not the program's own.
        let write = object
            .symbols()
            .find(|s| s.name() == Ok("write"))
            .unwrap()
            .address();
        assert!(!image.has_source(write));
        assert_eq!(image.describe_return(write + 4), None);
    }
}

//! Turning raw argument and return values into what the trace shows, by DWARF type: integers
//! at their width and sign, enum names, strings read from guest memory, struct pointers with
//! their type, and errno names for negative returns.

use rrr_tracer::{format_enum, Index, TypeId, ValueKind};

use super::guest::Memory;

/// Strings read from guest memory are cut here (the trace shows that they were).
pub const MAX_STRING: usize = 96;

/// An argument value, owned until the event is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    Int(i64),
    Uint(u64),
    Pointer(u64),
    Bool(bool),
    Str(String),
}

impl Shown {
    pub fn value(&self) -> rrr_perfetto::Value<'_> {
        use rrr_perfetto::Value;
        match self {
            Shown::Int(v) => Value::Int(*v),
            Shown::Uint(v) => Value::Uint(*v),
            Shown::Pointer(v) => Value::Pointer(*v),
            Shown::Bool(v) => Value::Bool(*v),
            Shown::Str(s) => Value::Str(s),
        }
    }
}

fn sign_extend(raw: u64, size: u8) -> i64 {
    match size {
        1 => raw as u8 as i8 as i64,
        2 => raw as u16 as i16 as i64,
        4 => raw as u32 as i32 as i64,
        _ => raw as i64,
    }
}

fn truncate(raw: u64, size: u8) -> u64 {
    match size {
        1 => raw & 0xff,
        2 => raw & 0xffff,
        4 => raw & 0xffff_ffff,
        _ => raw,
    }
}

/// `raw` as an argument of type `ty`, at the call: a `char *` (not `const`) is a buffer the
/// callee is to write, shown as its address.
pub fn show_arg(index: &Index, ty: TypeId, raw: u64, mem: &mut dyn Memory) -> Shown {
    match index.value_kind(ty) {
        ValueKind::CharBuffer => Shown::Pointer(raw),
        _ => show(index, ty, raw, mem),
    }
}

/// `raw` as a value of type `ty` (a return value: strings are read, `char *` ones too).
pub fn show(index: &Index, ty: TypeId, raw: u64, mem: &mut dyn Memory) -> Shown {
    match index.value_kind(ty) {
        ValueKind::Int { size, signed: true } => Shown::Int(sign_extend(raw, size)),
        ValueKind::Int { size, .. } => Shown::Uint(truncate(raw, size)),
        ValueKind::Bool => Shown::Bool(raw & 0xff != 0),
        ValueKind::Enum {
            size,
            signed,
            enumerators,
            flags,
        } => {
            let value = if signed {
                sign_extend(raw, size)
            } else {
                truncate(raw, size) as i64
            };
            Shown::Str(format_enum(enumerators, flags, value))
        }
        ValueKind::Str | ValueKind::CharBuffer => match raw {
            0 => Shown::Str("NULL".into()),
            _ => match mem.read_c_string(raw, MAX_STRING) {
                Some((s, cut)) => Shown::Str(format!("{s:?}{}", if cut { "..." } else { "" })),
                None => Shown::Pointer(raw),
            },
        },
        // The type is in the argument's name (see `arg_name`): the value stays a pointer, so
        // the UI shows it in hex and the trace does not intern one string per address.
        ValueKind::StructPtr { .. } => Shown::Pointer(raw),
        ValueKind::Pointer => Shown::Pointer(raw),
        ValueKind::Float { .. } | ValueKind::Struct { .. } | ValueKind::Void => {
            Shown::Str(index.type_name(ty))
        }
        ValueKind::Unknown => Shown::Uint(raw),
    }
}

/// How an argument is named in the trace: a struct pointer carries its type
/// (`how (struct open_how *)`), everything else its C name.
pub fn arg_name(index: &Index, name: &str, ty: TypeId) -> String {
    match index.value_kind(ty) {
        ValueKind::StructPtr { .. } => format!("{name} ({})", index.type_name(ty)),
        _ => name.to_owned(),
    }
}

/// A system call's return value: the number, and the errno's name when it is an error.
pub fn syscall_return(raw: u64) -> (i64, Option<&'static str>) {
    let value = raw as i64;
    if (-4095..0).contains(&value) {
        (value, errno_name(-value))
    } else {
        (value, None)
    }
}

/// Linux's errno names (asm-generic/errno-base.h and errno.h), and the kernel-internal codes
/// that can leak to a trace of kernel functions.
pub fn errno_name(errno: i64) -> Option<&'static str> {
    const NAMES: [&str; 134] = [
        "",
        "EPERM",
        "ENOENT",
        "ESRCH",
        "EINTR",
        "EIO",
        "ENXIO",
        "E2BIG",
        "ENOEXEC",
        "EBADF",
        "ECHILD",
        "EAGAIN",
        "ENOMEM",
        "EACCES",
        "EFAULT",
        "ENOTBLK",
        "EBUSY",
        "EEXIST",
        "EXDEV",
        "ENODEV",
        "ENOTDIR",
        "EISDIR",
        "EINVAL",
        "ENFILE",
        "EMFILE",
        "ENOTTY",
        "ETXTBSY",
        "EFBIG",
        "ENOSPC",
        "ESPIPE",
        "EROFS",
        "EMLINK",
        "EPIPE",
        "EDOM",
        "ERANGE",
        "EDEADLK",
        "ENAMETOOLONG",
        "ENOLCK",
        "ENOSYS",
        "ENOTEMPTY",
        "ELOOP",
        "",
        "ENOMSG",
        "EIDRM",
        "ECHRNG",
        "EL2NSYNC",
        "EL3HLT",
        "EL3RST",
        "ELNRNG",
        "EUNATCH",
        "ENOCSI",
        "EL2HLT",
        "EBADE",
        "EBADR",
        "EXFULL",
        "ENOANO",
        "EBADRQC",
        "EBADSLT",
        "",
        "EBFONT",
        "ENOSTR",
        "ENODATA",
        "ETIME",
        "ENOSR",
        "ENONET",
        "ENOPKG",
        "EREMOTE",
        "ENOLINK",
        "EADV",
        "ESRMNT",
        "ECOMM",
        "EPROTO",
        "EMULTIHOP",
        "EDOTDOT",
        "EBADMSG",
        "EOVERFLOW",
        "ENOTUNIQ",
        "EBADFD",
        "EREMCHG",
        "ELIBACC",
        "ELIBBAD",
        "ELIBSCN",
        "ELIBMAX",
        "ELIBEXEC",
        "EILSEQ",
        "ERESTART",
        "ESTRPIPE",
        "EUSERS",
        "ENOTSOCK",
        "EDESTADDRREQ",
        "EMSGSIZE",
        "EPROTOTYPE",
        "ENOPROTOOPT",
        "EPROTONOSUPPORT",
        "ESOCKTNOSUPPORT",
        "EOPNOTSUPP",
        "EPFNOSUPPORT",
        "EAFNOSUPPORT",
        "EADDRINUSE",
        "EADDRNOTAVAIL",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "ECONNABORTED",
        "ECONNRESET",
        "ENOBUFS",
        "EISCONN",
        "ENOTCONN",
        "ESHUTDOWN",
        "ETOOMANYREFS",
        "ETIMEDOUT",
        "ECONNREFUSED",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "EALREADY",
        "EINPROGRESS",
        "ESTALE",
        "EUCLEAN",
        "ENOTNAM",
        "ENAVAIL",
        "EISNAM",
        "EREMOTEIO",
        "EDQUOT",
        "ENOMEDIUM",
        "EMEDIUMTYPE",
        "ECANCELED",
        "ENOKEY",
        "EKEYEXPIRED",
        "EKEYREVOKED",
        "EKEYREJECTED",
        "EOWNERDEAD",
        "ENOTRECOVERABLE",
        "ERFKILL",
        "EHWPOISON",
    ];
    let name = match errno {
        512 => "ERESTARTSYS",
        513 => "ERESTARTNOINTR",
        514 => "ERESTARTNOHAND",
        515 => "ENOIOCTLCMD",
        516 => "ERESTART_RESTARTBLOCK",
        517 => "EPROBE_DEFER",
        518 => "EOPENSTALE",
        524 => "ENOTSUPP",
        n => NAMES.get(usize::try_from(n).ok()?).copied()?,
    };
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_match_the_kernel_headers() {
        assert_eq!(errno_name(2), Some("ENOENT"));
        assert_eq!(errno_name(22), Some("EINVAL"));
        assert_eq!(errno_name(38), Some("ENOSYS"));
        assert_eq!(errno_name(110), Some("ETIMEDOUT"));
        assert_eq!(errno_name(133), Some("EHWPOISON"));
        assert_eq!(errno_name(512), Some("ERESTARTSYS"));
        assert_eq!(errno_name(41), None);
        assert_eq!(errno_name(0), None);
        assert_eq!(errno_name(4000), None);
    }

    #[test]
    fn syscall_returns_split_into_values_and_errors() {
        assert_eq!(syscall_return(3), (3, None));
        assert_eq!(syscall_return((-2i64) as u64), (-2, Some("ENOENT")));
        assert_eq!(
            syscall_return(0xffff_8880_0000_0000),
            (0xffff_8880_0000_0000u64 as i64, None)
        );
    }

    #[test]
    fn integers_keep_their_width_and_sign() {
        assert_eq!(sign_extend(0xffff_ffff, 4), -1);
        assert_eq!(sign_extend(0x1_0000_0005, 4), 5);
        assert_eq!(truncate(0x1234_5678_9abc, 2), 0x9abc);
    }
}

//! The config fragments shipped with rrr, compiled in so the binary works from anywhere.

/// Everything the default guest kernel has on top of `tinyconfig`.
pub const GUEST: &str = include_str!("../fragments/guest.config");
/// The subset rrr cannot work without; merged last, even over a full `--config`.
pub const REQUIRED: &str = include_str!("../fragments/rrr-required.config");
/// The carrier kernel on top of `tinyconfig`.
pub const CARRIER: &str = include_str!("../fragments/carrier.config");
/// What `rrr from-syzbot` adds to a syzbot config on top of [`REQUIRED`] (KCOV everywhere).
pub const SYZBOT: &str = include_str!("../fragments/syzbot.config");

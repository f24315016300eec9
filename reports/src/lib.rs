//! What the guest kernel reported on its console, titled the way syzbot titles it.
//!
//! This is about kernel text, not virtualization, so it lives apart from the VMM: the VMM hands
//! console bytes to a writer, and `rrr run` feeds them to a [`CrashDetector`].

pub mod crash;

pub use crash::{CrashDetector, CrashReport};

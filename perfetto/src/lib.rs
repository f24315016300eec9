//! Perfetto output for rrr: the TrackEvent protobuf types, a streaming trace writer and the
//! local HTTP server the Perfetto UI fetches a trace from.
//!
//! The crate knows nothing of KVM or of the guest: the tracer hands it tracks (processes and
//! threads by pid and tid) and events (slices, instants, counters with typed arguments).

mod error;
mod event;
mod intern;
pub mod proto;
mod server;
mod writer;

pub use error::{ServeError, WriteError};
pub use event::{Arg, Event, Kind, TrackId, Value};
pub use server::{ui_link, TraceServer, DEFAULT_PORT};
pub use writer::{Stats, TraceWriter, MAX_DEPTH};

//! The crate's errors: one enum for writing a trace, one for serving it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot create the trace file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the trace")]
    Io(#[source] std::io::Error),
    /// Perfetto reads pid and tid 0 as the idle task: a guest task with 0 is a decoding bug.
    #[error("pid and tid must be non-zero (0 is the idle task); use a named track instead")]
    ZeroPid,
    #[error("event on track {0}, which has no descriptor")]
    UnknownTrack(u64),
    #[error("slice end on track {0}, which has no open slice")]
    UnbalancedEnd(u64),
    #[error("slices on track {0} nest deeper than {max}", max = crate::MAX_DEPTH)]
    TooDeep(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("port {port} on 127.0.0.1 is in use (another `rrr serve`, or trace_processor?); choose another with --port")]
    PortInUse { port: u16 },
    #[error("cannot listen on 127.0.0.1:{port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the trace file {path}")]
    Trace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the trace path {0} has no file name")]
    NoFileName(PathBuf),
    #[error("accepting a connection failed")]
    Accept(#[source] std::io::Error),
}

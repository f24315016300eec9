//! What the tracer hands the writer: tracks, events and their typed arguments. Plain data, no
//! protobuf: the writer turns them into packets.

/// A track: its uuid in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrackId(pub u64);

/// A typed argument value, shown in the UI's argument panel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Int(i64),
    Uint(u64),
    /// Shown in hex.
    Pointer(u64),
    Bool(bool),
    Double(f64),
    Str(&'a str),
}

/// A named argument of an event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arg<'a> {
    pub name: &'a str,
    pub value: Value<'a>,
}

impl<'a> Arg<'a> {
    pub fn new(name: &'a str, value: Value<'a>) -> Self {
        Arg { name, value }
    }
}

/// What an event does on its track.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind<'a> {
    /// Opens a slice (a function call, a syscall).
    Begin(&'a str),
    /// Closes the innermost open slice; its arguments merge into the slice (a return value).
    End,
    /// A point in time.
    Instant(&'a str),
    /// A new value on a counter track.
    Counter(i64),
}

/// One event. Build with the `Kind` and add arguments, a category or flows.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub ts: u64,
    pub track: TrackId,
    pub kind: Kind<'a>,
    pub category: Option<&'a str>,
    pub args: &'a [Arg<'a>],
    /// Flows leaving this event (an arrow to the event that terminates the same id).
    pub flow_ids: &'a [u64],
    /// Flows arriving at this event.
    pub terminating_flow_ids: &'a [u64],
}

impl<'a> Event<'a> {
    pub fn new(ts: u64, track: TrackId, kind: Kind<'a>) -> Self {
        Event {
            ts,
            track,
            kind,
            category: None,
            args: &[],
            flow_ids: &[],
            terminating_flow_ids: &[],
        }
    }

    pub fn args(mut self, args: &'a [Arg<'a>]) -> Self {
        self.args = args;
        self
    }

    pub fn category(mut self, category: &'a str) -> Self {
        self.category = Some(category);
        self
    }

    pub fn flows(mut self, ids: &'a [u64]) -> Self {
        self.flow_ids = ids;
        self
    }

    pub fn terminating_flows(mut self, ids: &'a [u64]) -> Self {
        self.terminating_flow_ids = ids;
        self
    }
}

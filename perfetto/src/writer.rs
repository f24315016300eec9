//! The streaming TrackEvent writer: one packet per event, written as it comes.
//!
//! Everything goes on one packet sequence. The first packet clears the sequence's incremental
//! state; every event packet interns its event name, argument names, category and string values,
//! carries the definitions of the ones it is first to use, and is flagged as needing incremental
//! state, which is what trace_processor requires before it resolves an iid.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use prost::Message;

use crate::event::{Arg, Event, Kind, TrackId, Value};
use crate::intern::{Interned, Interner};
use crate::proto::{
    debug_annotation, trace_packet, track_descriptor, track_event, CounterDescriptor,
    DebugAnnotation, InternedData, InternedName, InternedString, ProcessDescriptor,
    ThreadDescriptor, TracePacket, TracePacketDefaults, TrackDescriptor, TrackEvent,
};
use crate::WriteError;

/// trace_processor rejects deeper slice stacks on one track.
pub const MAX_DEPTH: u32 = 512;

/// Perfetto's builtin BOOTTIME clock: the default for TrackEvent timestamps. rrr writes virtual
/// nanoseconds into it; the UI only needs a monotonic clock.
const CLOCK_BOOTTIME: u32 = 6;

/// String values longer than this are written inline rather than interned: long strings rarely
/// repeat, and each interned one stays in trace_processor's table.
const MAX_INTERNED_STRING: usize = 128;
const MAX_INTERNED_STRINGS: usize = 1 << 16;

/// Counts of what was written, for the benchmark and the summary line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub packets: u64,
    pub events: u64,
    pub bytes: u64,
}

#[derive(Debug)]
struct TrackState {
    /// Open slices, so an END without a BEGIN or a stack past 512 is refused here rather than
    /// silently dropped by trace_processor.
    depth: u32,
}

/// Writes a Perfetto trace to `W` one packet at a time.
pub struct TraceWriter<W: Write> {
    out: W,
    sequence_id: u32,
    event_names: Interner,
    arg_names: Interner,
    categories: Interner,
    strings: Interner,
    tracks: HashMap<u64, TrackState>,
    /// Tracks by pid and by (pid, tid), with the name last written, so asking for a task's
    /// track on every event costs a lookup, and a descriptor only when the name changes.
    processes: HashMap<i32, (TrackId, Option<String>)>,
    threads: HashMap<(i32, i32), (TrackId, String)>,
    next_uuid: u64,
    stats: Stats,
    /// One packet's encoding, reused so an event costs no allocation for its bytes.
    buf: Vec<u8>,
}

impl TraceWriter<BufWriter<File>> {
    /// Creates (truncates) `path` and starts the trace.
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        let file = File::create(path).map_err(|source| WriteError::Create {
            path: path.to_owned(),
            source,
        })?;
        TraceWriter::new(BufWriter::with_capacity(1 << 20, file))
    }
}

impl<W: Write> TraceWriter<W> {
    /// Starts a trace on `out` with the first packet of the sequence.
    pub fn new(out: W) -> Result<Self, WriteError> {
        let mut writer = TraceWriter {
            out,
            sequence_id: 1,
            event_names: Interner::default(),
            arg_names: Interner::default(),
            categories: Interner::default(),
            strings: Interner::with_capacity_limit(MAX_INTERNED_STRINGS),
            tracks: HashMap::new(),
            processes: HashMap::new(),
            threads: HashMap::new(),
            next_uuid: 1,
            stats: Stats::default(),
            buf: Vec::with_capacity(256),
        };
        let first = TracePacket {
            sequence_flags: Some(trace_packet::SEQ_INCREMENTAL_STATE_CLEARED),
            first_packet_on_sequence: Some(true),
            trace_packet_defaults: Some(TracePacketDefaults {
                timestamp_clock_id: Some(CLOCK_BOOTTIME),
                track_event_defaults: None,
            }),
            ..writer.packet(None)
        };
        writer.write_packet(&first)?;
        Ok(writer)
    }

    /// The process track of `pid`, created (with `name`) on first use; a later call with a
    /// different name renames it, one without a name leaves it as it is.
    pub fn process(&mut self, pid: i32, name: Option<&str>) -> Result<TrackId, WriteError> {
        if pid == 0 {
            return Err(WriteError::ZeroPid);
        }
        let track = match self.processes.get(&pid) {
            Some((t, _)) if name.is_none() => return Ok(*t),
            Some((t, old)) if old.as_deref() == name => return Ok(*t),
            Some((t, _)) => *t,
            None => self.new_track(),
        };
        self.processes.insert(pid, (track, name.map(str::to_owned)));
        let desc = TrackDescriptor {
            uuid: Some(track.0),
            process: Some(ProcessDescriptor {
                pid: Some(pid),
                cmdline: Vec::new(),
                process_name: name.map(str::to_owned),
            }),
            ..Default::default()
        };
        self.write_descriptor(desc)?;
        Ok(track)
    }

    /// The thread track of (`pid`, `tid`), created on first use under its process track. Calling
    /// again with another name renames the thread (a task's `comm` changes at exec).
    pub fn thread(&mut self, pid: i32, tid: i32, name: &str) -> Result<TrackId, WriteError> {
        if pid == 0 || tid == 0 {
            return Err(WriteError::ZeroPid);
        }
        let track = match self.threads.get(&(pid, tid)) {
            Some((t, old)) if old == name => return Ok(*t),
            Some((t, _)) => *t,
            None => self.new_track(),
        };
        let process = self.process(pid, None)?;
        self.threads.insert((pid, tid), (track, name.to_owned()));
        let desc = TrackDescriptor {
            uuid: Some(track.0),
            parent_uuid: Some(process.0),
            thread: Some(ThreadDescriptor {
                pid: Some(pid),
                tid: Some(i64::from(tid)),
                thread_name: Some(name.to_owned()),
            }),
            ..Default::default()
        };
        self.write_descriptor(desc)?;
        Ok(track)
    }

    /// A track of its own, for what belongs to no task (the idle task, interrupts), optionally
    /// nested under another track.
    pub fn named_track(
        &mut self,
        name: &str,
        parent: Option<TrackId>,
    ) -> Result<TrackId, WriteError> {
        let track = self.new_track();
        let desc = TrackDescriptor {
            uuid: Some(track.0),
            parent_uuid: parent.map(|p| p.0),
            name: Some(track_descriptor::Name::Name(name.to_owned())),
            ..Default::default()
        };
        self.write_descriptor(desc)?;
        Ok(track)
    }

    /// A counter track (for instance, events per task or ring-buffer fill).
    pub fn counter_track(
        &mut self,
        name: &str,
        unit: Option<&str>,
        parent: Option<TrackId>,
    ) -> Result<TrackId, WriteError> {
        let track = self.new_track();
        let desc = TrackDescriptor {
            uuid: Some(track.0),
            parent_uuid: parent.map(|p| p.0),
            name: Some(track_descriptor::Name::Name(name.to_owned())),
            counter: Some(CounterDescriptor {
                unit_name: unit.map(str::to_owned),
                is_incremental: None,
            }),
            ..Default::default()
        };
        self.write_descriptor(desc)?;
        Ok(track)
    }

    pub fn begin(
        &mut self,
        ts: u64,
        track: TrackId,
        name: &str,
        args: &[Arg<'_>],
    ) -> Result<(), WriteError> {
        self.event(&Event::new(ts, track, Kind::Begin(name)).args(args))
    }

    pub fn end(&mut self, ts: u64, track: TrackId, args: &[Arg<'_>]) -> Result<(), WriteError> {
        self.event(&Event::new(ts, track, Kind::End).args(args))
    }

    pub fn instant(
        &mut self,
        ts: u64,
        track: TrackId,
        name: &str,
        args: &[Arg<'_>],
    ) -> Result<(), WriteError> {
        self.event(&Event::new(ts, track, Kind::Instant(name)).args(args))
    }

    pub fn counter(&mut self, ts: u64, track: TrackId, value: i64) -> Result<(), WriteError> {
        self.event(&Event::new(ts, track, Kind::Counter(value)))
    }

    /// Slices open on `track` now.
    pub fn depth(&self, track: TrackId) -> Option<u32> {
        self.tracks.get(&track.0).map(|t| t.depth)
    }

    /// Writes one event as one packet.
    pub fn event(&mut self, ev: &Event<'_>) -> Result<(), WriteError> {
        let state = self
            .tracks
            .get_mut(&ev.track.0)
            .ok_or(WriteError::UnknownTrack(ev.track.0))?;
        match ev.kind {
            Kind::Begin(_) if state.depth >= MAX_DEPTH => {
                return Err(WriteError::TooDeep(ev.track.0))
            }
            Kind::Begin(_) => state.depth += 1,
            Kind::End if state.depth == 0 => return Err(WriteError::UnbalancedEnd(ev.track.0)),
            Kind::End => state.depth -= 1,
            Kind::Instant(_) | Kind::Counter(_) => {}
        }

        let mut interned = InternedData::default();
        let (ty, name_field, counter_value) = match ev.kind {
            Kind::Begin(name) => (
                track_event::Type::SliceBegin,
                Some(self.event_name(name, &mut interned)),
                None,
            ),
            Kind::End => (track_event::Type::SliceEnd, None, None),
            Kind::Instant(name) => (
                track_event::Type::Instant,
                Some(self.event_name(name, &mut interned)),
                None,
            ),
            Kind::Counter(v) => (
                track_event::Type::Counter,
                None,
                Some(track_event::CounterValue::Int(v)),
            ),
        };
        let mut category_iids = Vec::new();
        let mut categories = Vec::new();
        if let Some(cat) = ev.category {
            match self.categories.intern(cat) {
                Interned::New(iid) => {
                    interned.event_categories.push(interned_name(iid, cat));
                    category_iids.push(iid);
                }
                Interned::Known(iid) => category_iids.push(iid),
                Interned::Inline => categories.push(cat.to_owned()),
            }
        }
        let debug_annotations = ev
            .args
            .iter()
            .map(|arg| self.annotation(arg, &mut interned))
            .collect();
        let track_event = TrackEvent {
            category_iids,
            categories,
            name_field,
            r#type: Some(ty as i32),
            track_uuid: Some(ev.track.0),
            counter_value,
            flow_ids: ev.flow_ids.to_vec(),
            terminating_flow_ids: ev.terminating_flow_ids.to_vec(),
            debug_annotations,
        };
        let packet = TracePacket {
            data: Some(trace_packet::Data::TrackEvent(track_event)),
            interned_data: (!interned.is_empty()).then_some(interned),
            // Every event may refer to iids (its own or earlier ones), so every event says it
            // depends on the sequence's incremental state.
            sequence_flags: Some(trace_packet::SEQ_NEEDS_INCREMENTAL_STATE),
            ..self.packet(Some(ev.ts))
        };
        self.write_packet(&packet)?;
        self.stats.events += 1;
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Pushes buffered packets to the output, so a reader (or a crash) sees everything so far.
    pub fn flush(&mut self) -> Result<(), WriteError> {
        self.out.flush().map_err(WriteError::Io)
    }

    /// Flushes and hands back the output.
    pub fn finish(mut self) -> Result<W, WriteError> {
        self.out.flush().map_err(WriteError::Io)?;
        Ok(self.out)
    }

    fn new_track(&mut self) -> TrackId {
        let t = TrackId(self.next_uuid);
        self.next_uuid += 1;
        self.tracks.insert(t.0, TrackState { depth: 0 });
        t
    }

    fn event_name(&mut self, name: &str, interned: &mut InternedData) -> track_event::NameField {
        match self.event_names.intern(name) {
            Interned::New(iid) => {
                interned.event_names.push(interned_name(iid, name));
                track_event::NameField::NameIid(iid)
            }
            Interned::Known(iid) => track_event::NameField::NameIid(iid),
            Interned::Inline => track_event::NameField::Name(name.to_owned()),
        }
    }

    fn annotation(&mut self, arg: &Arg<'_>, interned: &mut InternedData) -> DebugAnnotation {
        use debug_annotation::{NameField, Value as V};
        let name_field = match self.arg_names.intern(arg.name) {
            Interned::New(iid) => {
                interned
                    .debug_annotation_names
                    .push(interned_name(iid, arg.name));
                NameField::NameIid(iid)
            }
            Interned::Known(iid) => NameField::NameIid(iid),
            Interned::Inline => NameField::Name(arg.name.to_owned()),
        };
        let value = match arg.value {
            Value::Int(v) => V::Int(v),
            Value::Uint(v) => V::Uint(v),
            Value::Pointer(v) => V::Pointer(v),
            Value::Bool(v) => V::Bool(v),
            Value::Double(v) => V::Double(v),
            Value::Str(s) if s.len() > MAX_INTERNED_STRING => V::String(s.to_owned()),
            Value::Str(s) => match self.strings.intern(s) {
                Interned::New(iid) => {
                    interned
                        .debug_annotation_string_values
                        .push(InternedString {
                            iid: Some(iid),
                            str: Some(s.as_bytes().to_vec()),
                        });
                    V::StringIid(iid)
                }
                Interned::Known(iid) => V::StringIid(iid),
                Interned::Inline => V::String(s.to_owned()),
            },
        };
        DebugAnnotation {
            name_field: Some(name_field),
            value: Some(value),
            ..Default::default()
        }
    }

    fn write_descriptor(&mut self, desc: TrackDescriptor) -> Result<(), WriteError> {
        let packet = TracePacket {
            data: Some(trace_packet::Data::TrackDescriptor(desc)),
            ..self.packet(None)
        };
        self.write_packet(&packet)
    }

    /// A packet on this writer's sequence; descriptors and the first packet have no time.
    fn packet(&self, ts: Option<u64>) -> TracePacket {
        TracePacket {
            timestamp: ts,
            sequence_id: Some(trace_packet::SequenceId::TrustedPacketSequenceId(
                self.sequence_id,
            )),
            ..Default::default()
        }
    }

    /// One `Trace.packet` record: tag 1 (length-delimited), the length, the packet.
    fn write_packet(&mut self, packet: &TracePacket) -> Result<(), WriteError> {
        let len = packet.encoded_len();
        let buf = &mut self.buf;
        buf.clear();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, buf);
        prost::encoding::encode_varint(len as u64, buf);
        packet.encode(buf).expect("a Vec grows to fit any message");
        self.out.write_all(buf).map_err(WriteError::Io)?;
        self.stats.packets += 1;
        self.stats.bytes += buf.len() as u64;
        Ok(())
    }
}

fn interned_name(iid: u64, name: &str) -> InternedName {
    InternedName {
        iid: Some(iid),
        name: Some(name.to_owned()),
    }
}

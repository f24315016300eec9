//! The writer's output decoded by an independent decoder: Google's generated protobuf classes
//! from PyPI's `perfetto` package (`tests/check_trace.py`), which also checks the rules
//! trace_processor enforces. `scripts/setup` installs the package (`pip install perfetto protobuf`).

use std::path::Path;
use std::process::Command;

use rrr_perfetto::{Arg, Event, Kind, TraceWriter, TrackId, Value, WriteError};
use serde_json::{json, Value as Json};

fn check(trace: &Path) -> Result<Json, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_trace.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(trace)
        .output()
        .expect("python3 is needed to decode traces");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("No module named"),
        "Google's perfetto protos are missing: `pip install perfetto protobuf` (scripts/setup)\n{stderr}"
    );
    if !out.status.success() {
        return Err(stderr);
    }
    Ok(serde_json::from_slice(&out.stdout).expect("the checker prints JSON"))
}

#[test]
fn a_written_trace_decodes_with_googles_classes_and_keeps_perfettos_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.pftrace");
    let mut w = TraceWriter::create(&path).unwrap();
    w.process(100, Some("stim")).unwrap();
    let main = w.thread(100, 100, "stim").unwrap();
    let worker = w.thread(100, 101, "worker").unwrap();
    let idle = w.named_track("swapper/0", None).unwrap();
    let fill = w.counter_track("ring fill", Some("bytes"), None).unwrap();

    let open_args = [
        Arg::new("filename", Value::Str("/tmp/x")),
        Arg::new("flags", Value::Int(-100)),
        Arg::new("mode", Value::Uint(0o644)),
    ];
    w.event(
        &Event::new(1000, main, Kind::Begin("openat"))
            .category("syscall")
            .args(&open_args),
    )
    .unwrap();
    let inner_args = [
        Arg::new("filename", Value::Str("/tmp/x")),
        Arg::new("how", Value::Pointer(0xffff_8880_0123_4000)),
        Arg::new("nonblock", Value::Bool(false)),
        Arg::new("zero", Value::Uint(0)),
    ];
    w.begin(1100, main, "do_sys_openat2", &inner_args).unwrap();
    w.end(1200, main, &[Arg::new("ret", Value::Int(3))])
        .unwrap();
    w.end(1300, main, &[Arg::new("ret", Value::Int(3))])
        .unwrap();
    w.event(&Event::new(1400, main, Kind::Instant("switch out")).flows(&[7]))
        .unwrap();
    w.event(
        &Event::new(1500, worker, Kind::Instant("switch in"))
            .terminating_flows(&[7])
            .args(&[Arg::new("ratio", Value::Double(0.5))]),
    )
    .unwrap();
    w.instant(1600, idle, "irq", &[]).unwrap();
    w.counter(1700, fill, 4096).unwrap();
    // Asking again costs nothing; a comm change at exec renames the thread on the same track.
    let packets = w.stats().packets;
    assert_eq!(w.thread(100, 101, "worker").unwrap(), worker);
    assert_eq!(w.process(100, Some("stim")).unwrap(), TrackId(1));
    assert_eq!(
        w.stats().packets,
        packets,
        "no descriptor for an unchanged name"
    );
    assert_eq!(w.thread(100, 101, "worker2").unwrap(), worker);
    assert_eq!(w.stats().packets, packets + 1);
    w.begin(1800, worker, "openat", &[]).unwrap();
    assert_eq!(w.depth(worker), Some(1));
    w.end(1900, worker, &[]).unwrap();
    let stats = w.stats();
    w.finish().unwrap();
    assert_eq!(stats.events, 10);
    assert_eq!(stats.bytes, std::fs::metadata(&path).unwrap().len());

    let got = check(&path).unwrap_or_else(|e| panic!("checker refused the trace: {e}"));
    let tracks = &got["tracks"];
    assert_eq!(tracks[0]["pid"], 100);
    assert_eq!(tracks[0]["name"], "stim");
    assert_eq!(tracks[1]["tid"], 100);
    assert_eq!(tracks[2]["tid"], 101);
    assert_eq!(tracks[2]["name"], "worker2");
    assert_eq!(tracks[3]["name"], "swapper/0");
    assert_eq!(tracks[4]["counter"], true);

    let events = got["events"].as_array().unwrap();
    assert_eq!(events.len(), 10);
    let e = |i: usize| &events[i];
    assert_eq!(e(0)["type"], "TYPE_SLICE_BEGIN");
    assert_eq!(e(0)["name"], "openat");
    assert_eq!(e(0)["track"], "stim");
    assert_eq!(e(0)["cats"], json!(["syscall"]));
    assert_eq!(
        e(0)["args"],
        json!({"filename": {"str": "/tmp/x"}, "flags": {"int": -100}, "mode": {"uint": 420}})
    );
    assert_eq!(e(1)["name"], "do_sys_openat2");
    assert_eq!(
        e(1)["args"],
        json!({"filename": {"str": "/tmp/x"}, "how": {"ptr": 0xffff_8880_0123_4000u64},
               "nonblock": {"bool": false}, "zero": {"uint": 0}})
    );
    assert_eq!(e(2)["type"], "TYPE_SLICE_END");
    assert_eq!(e(2)["args"], json!({"ret": {"int": 3}}));
    assert_eq!(e(4)["flows"], json!([7]));
    assert_eq!(e(5)["terminating_flows"], json!([7]));
    assert_eq!(e(5)["args"], json!({"ratio": {"double": 0.5}}));
    assert_eq!(e(6)["track"], "swapper/0");
    assert_eq!(e(7)["type"], "TYPE_COUNTER");
    assert_eq!(e(7)["value"], 4096);
    assert_eq!(e(0)["ts"], 1000);
    assert_eq!(got["open"], json!({}));
}

/// The checker is only worth something if it refuses a broken trace: here an event that uses
/// name iid 5, which nothing defined.
#[test]
fn the_checker_refuses_an_undefined_iid() {
    use prost::Message;
    use rrr_perfetto::proto::{self, trace_packet, track_event};
    let packet = |p: proto::TracePacket| proto::Trace { packet: vec![p] }.encode_to_vec();
    let seq = Some(trace_packet::SequenceId::TrustedPacketSequenceId(1));
    let mut bytes = packet(proto::TracePacket {
        sequence_id: seq.clone(),
        sequence_flags: Some(trace_packet::SEQ_INCREMENTAL_STATE_CLEARED),
        ..Default::default()
    });
    bytes.extend(packet(proto::TracePacket {
        sequence_id: seq.clone(),
        data: Some(trace_packet::Data::TrackDescriptor(
            proto::TrackDescriptor {
                uuid: Some(9),
                ..Default::default()
            },
        )),
        ..Default::default()
    }));
    bytes.extend(packet(proto::TracePacket {
        timestamp: Some(1),
        sequence_id: seq,
        sequence_flags: Some(trace_packet::SEQ_NEEDS_INCREMENTAL_STATE),
        data: Some(trace_packet::Data::TrackEvent(proto::TrackEvent {
            name_field: Some(track_event::NameField::NameIid(5)),
            r#type: Some(track_event::Type::Instant as i32),
            track_uuid: Some(9),
            ..Default::default()
        })),
        ..Default::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.pftrace");
    std::fs::write(&path, bytes).unwrap();
    let err = check(&path).expect_err("an undefined iid must be refused");
    assert!(err.contains("iid 5 used before it is defined"), "{err}");
}

#[test]
fn the_writer_refuses_what_perfetto_would_drop() {
    let mut w = TraceWriter::new(Vec::new()).unwrap();
    assert!(matches!(w.thread(0, 5, "idle"), Err(WriteError::ZeroPid)));
    let t = w.thread(1, 1, "init").unwrap();
    assert!(matches!(
        w.end(1, t, &[]),
        Err(WriteError::UnbalancedEnd(_))
    ));
    for i in 0..512 {
        w.begin(i, t, "f", &[]).unwrap();
    }
    assert!(matches!(
        w.begin(600, t, "f", &[]),
        Err(WriteError::TooDeep(_))
    ));
    assert!(matches!(
        w.instant(1, rrr_perfetto::TrackId(999), "x", &[]),
        Err(WriteError::UnknownTrack(999))
    ));
}

/// Bytes assembled by hand from the field numbers in Perfetto's protos, so a wrong tag in
/// `proto.rs` shows even where the Python decoder is missing.
#[test]
fn an_event_packet_has_the_bytes_the_spec_gives() {
    let mut w = TraceWriter::new(Vec::new()).unwrap();
    let t = w.named_track("k", None).unwrap();
    let before = w.stats().bytes as usize;
    w.begin(5, t, "f", &[Arg::new("a", Value::Int(1))]).unwrap();
    let out = w.finish().unwrap();
    let packet = &out[before..];
    // Field order is the encoder's choice (prost: declaration order); the values are the spec's.
    #[rustfmt::skip]
    let want: Vec<u8> = vec![
        0x0a, 36,                       // Trace.packet (1, LEN), length
        0x40, 5,                        // timestamp (8, VARINT) = 5
        0x50, 1,                        // trusted_packet_sequence_id (10) = 1
        0x5a, 12,                       // track_event (11, LEN)
          0x22, 4, 0x08, 1, 0x20, 1,    //   debug_annotations (4): name_iid (1) = 1, int_value (4) = 1
          0x48, 1,                      //   type (9) = TYPE_SLICE_BEGIN
          0x50, 1,                      //   name_iid (10) = 1
          0x58, t.0 as u8,              //   track_uuid (11)
        0x62, 14,                       // interned_data (12, LEN)
          0x12, 5, 0x08, 1, 0x12, 1, b'f', //   event_names (2): iid (1) = 1, name (2) = "f"
          0x1a, 5, 0x08, 1, 0x12, 1, b'a', //   debug_annotation_names (3): iid 1, name "a"
        0x68, 2,                        // sequence_flags (13) = SEQ_NEEDS_INCREMENTAL_STATE
    ];
    assert_eq!(packet, &want[..], "{packet:02x?}");
}

/// Past the interning table's limit, new strings go inline and the trace stays valid; strings
/// interned before the limit keep their iids.
#[test]
fn unique_strings_past_the_interning_limit_are_written_inline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.pftrace");
    let mut w = TraceWriter::create(&path).unwrap();
    let t = w.thread(7, 7, "many").unwrap();
    let n = 70_000u64;
    for i in 0..n {
        let s = format!("/tmp/f{i}");
        w.instant(i + 1, t, "open", &[Arg::new("path", Value::Str(&s))])
            .unwrap();
    }
    w.instant(n + 1, t, "open", &[Arg::new("path", Value::Str("/tmp/f0"))])
        .unwrap();
    w.finish().unwrap();
    let got = check(&path).unwrap_or_else(|e| panic!("checker refused the trace: {e}"));
    let events = got["events"].as_array().unwrap();
    assert_eq!(events.len() as u64, n + 1);
    assert_eq!(events[69_999]["args"]["path"]["str"], "/tmp/f69999");
    assert_eq!(events[n as usize]["args"]["path"]["str"], "/tmp/f0");
}

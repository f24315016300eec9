#!/usr/bin/env python3
"""Decodes a trace with Google's own generated classes (PyPI `perfetto`) and checks the rules
trace_processor enforces. Prints the events with every iid resolved, as JSON, for the Rust test to
compare with what it wrote. Exits non-zero, naming the rule, on the first violation."""

import json
import sys

from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

CLEARED = pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
NEEDS = pb.TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
TE = pb.TrackEvent


def fail(msg):
    print(f"rule broken: {msg}", file=sys.stderr)
    sys.exit(1)


def main(path):
    trace = pb.Trace()
    with open(path, "rb") as f:
        trace.ParseFromString(f.read())

    tracks = {}  # uuid -> descriptor summary
    state = {}  # sequence id -> {"valid": bool, tables}
    depth = {}  # track uuid -> open slices
    last_ts = {}  # track uuid -> last timestamp
    events = []
    for i, p in enumerate(trace.packet):
        if not p.HasField("trusted_packet_sequence_id"):
            fail(f"packet {i} has no sequence id")
        seq = p.trusted_packet_sequence_id
        st = state.setdefault(seq, {"valid": False, "names": {}, "args": {}, "cats": {}, "strs": {}})
        if p.sequence_flags & CLEARED:
            st.update(valid=True, names={}, args={}, cats={}, strs={})
        if p.HasField("interned_data"):
            if not st["valid"]:
                fail(f"packet {i} interns data before the incremental state is cleared")
            d = p.interned_data
            for e in d.event_names:
                st["names"][e.iid] = e.name
            for e in d.debug_annotation_names:
                st["args"][e.iid] = e.name
            for e in d.event_categories:
                st["cats"][e.iid] = e.name
            for e in d.debug_annotation_string_values:
                st["strs"][e.iid] = e.str.decode()

        if p.HasField("track_descriptor"):
            t = p.track_descriptor
            desc = {"uuid": t.uuid, "parent": t.parent_uuid, "name": t.name}
            if t.HasField("process"):
                if t.process.pid == 0:
                    fail(f"process track {t.uuid} has pid 0")
                desc.update(pid=t.process.pid, name=t.process.process_name)
            if t.HasField("thread"):
                if t.thread.pid == 0 or t.thread.tid == 0:
                    fail(f"thread track {t.uuid} has pid or tid 0")
                parent = tracks.get(t.parent_uuid, {})
                if parent.get("pid") != t.thread.pid or "tid" in parent:
                    fail(f"thread track {t.uuid} is not under its process's track")
                same = [u for u, d in tracks.items() if u != t.uuid and d.get("tid") == t.thread.tid
                        and d.get("pid") == t.thread.pid]
                if same:
                    fail(f"thread ({t.thread.pid}, {t.thread.tid}) has two tracks")
                desc.update(pid=t.thread.pid, tid=t.thread.tid, name=t.thread.thread_name)
            if t.HasField("counter"):
                desc["counter"] = True
            tracks[t.uuid] = desc
            continue

        if not p.HasField("track_event"):
            continue
        e = p.track_event
        if e.type == TE.TYPE_UNSPECIFIED:
            fail(f"packet {i}: track event without a type")
        if not p.HasField("timestamp"):
            fail(f"packet {i}: track event without a timestamp")
        if e.track_uuid not in tracks:
            fail(f"packet {i}: track {e.track_uuid} has no descriptor yet")
        uses_iids = e.HasField("name_iid") or len(e.category_iids) > 0 or any(
            a.HasField("name_iid") or a.HasField("string_value_iid") for a in e.debug_annotations
        )
        if uses_iids and not (p.sequence_flags & NEEDS):
            fail(f"packet {i} uses iids without SEQ_NEEDS_INCREMENTAL_STATE")
        if uses_iids and not st["valid"]:
            fail(f"packet {i} uses iids before the incremental state is cleared")

        def lookup(table, iid):
            if iid == 0 or iid not in st[table]:
                fail(f"packet {i}: {table} iid {iid} used before it is defined")
            return st[table][iid]

        name = lookup("names", e.name_iid) if e.HasField("name_iid") else e.name
        cats = [lookup("cats", c) for c in e.category_iids] + list(e.categories)
        args = {}
        for a in e.debug_annotations:
            an = lookup("args", a.name_iid) if a.HasField("name_iid") else a.name
            kind = a.WhichOneof("value")
            if kind == "string_value_iid":
                args[an] = {"str": lookup("strs", a.string_value_iid)}
            elif kind == "string_value":
                args[an] = {"str": a.string_value}
            elif kind == "pointer_value":
                args[an] = {"ptr": a.pointer_value}
            elif kind == "bool_value":
                args[an] = {"bool": a.bool_value}
            elif kind == "int_value":
                args[an] = {"int": a.int_value}
            elif kind == "uint_value":
                args[an] = {"uint": a.uint_value}
            elif kind == "double_value":
                args[an] = {"double": a.double_value}
            else:
                fail(f"packet {i}: annotation {an} has no value")

        if p.timestamp < last_ts.get(e.track_uuid, 0):
            fail(f"packet {i}: time goes backwards on track {e.track_uuid}")
        last_ts[e.track_uuid] = p.timestamp
        d = depth.setdefault(e.track_uuid, 0)
        if e.type == TE.TYPE_SLICE_BEGIN:
            if d + 1 > 512:
                fail(f"packet {i}: slices deeper than 512")
            depth[e.track_uuid] = d + 1
        elif e.type == TE.TYPE_SLICE_END:
            if d == 0:
                fail(f"packet {i}: slice end with no open slice")
            depth[e.track_uuid] = d - 1
        kind = TE.Type.Name(e.type)
        ev = {"ts": p.timestamp, "track": tracks[e.track_uuid]["name"], "uuid": e.track_uuid,
              "type": kind, "name": name,
              "cats": cats, "args": args, "flows": list(e.flow_ids),
              "terminating_flows": list(e.terminating_flow_ids)}
        if e.type == TE.TYPE_COUNTER:
            ev["value"] = e.counter_value
        events.append(ev)

    json.dump({"tracks": sorted(tracks.values(), key=lambda t: t["uuid"]), "events": events,
               "open": {str(k): v for k, v in depth.items() if v}}, sys.stdout)


main(sys.argv[1])

//! The control port: the guest agent's line to the VMM (`rrr_guest::protocol`).
//!
//! The agent writes 32-bit messages with `outl` and asks for GO with `inl`. Every access is a
//! synchronous exit, so the events land at the same virtual time on every run; the run loop
//! collects them with [`ControlPort::take_events`]. The guest is untrusted: bad words and
//! accesses of the wrong width are logged once and otherwise ignored.

use rrr_guest::protocol::{go_word, Command, Message};

use crate::bus::{BusDevice, DeviceContext};
use crate::clock::VirtualTime;

/// What the agent told the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlEvent {
    Message(Message),
}

/// The control device at [`rrr_guest::protocol::CONTROL_PORT`].
/// The conversation so far. The time limit is not part of it: it belongs to the stimulus run
/// after the snapshot, not to the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlState {
    ready_seen: bool,
    go_held: bool,
    /// (virtual time, raw word) of every message received.
    events: Vec<(VirtualTime, u32)>,
}

#[derive(Debug, Clone)]
pub struct ControlPort {
    time_limit_secs: u32,
    ready_seen: bool,
    go_held: bool,
    events: Vec<(VirtualTime, ControlEvent)>,
    warned_bad_word: bool,
    warned_bad_access: bool,
}

impl ControlPort {
    /// `time_limit_secs` is handed to the agent with GO (0: no limit).
    pub fn new(time_limit_secs: u32) -> Self {
        ControlPort {
            time_limit_secs,
            ready_seen: false,
            go_held: false,
            events: Vec::new(),
            warned_bad_word: false,
            warned_bad_access: false,
        }
    }

    /// While held, the agent's GO requests read 0 and it keeps asking (e.g. until a snapshot
    /// has been taken).
    pub fn save(&self) -> ControlState {
        ControlState {
            ready_seen: self.ready_seen,
            go_held: self.go_held,
            events: self
                .events
                .iter()
                .map(|(at, ControlEvent::Message(m))| (*at, m.encode()))
                .collect(),
        }
    }

    /// Puts the saved conversation back; this run's stimulus time limit stays. Words that do
    /// not decode are dropped: only decoded messages were ever kept.
    pub fn restore_state(&mut self, state: &ControlState) {
        self.ready_seen = state.ready_seen;
        self.go_held = state.go_held;
        self.events = state
            .events
            .iter()
            .filter_map(|(at, word)| {
                Some((*at, ControlEvent::Message(Message::decode(*word).ok()?)))
            })
            .collect();
    }

    pub fn hold_go(&mut self, hold: bool) {
        self.go_held = hold;
    }

    /// The events since the last call, in the order they happened.
    pub fn take_events(&mut self) -> Vec<(VirtualTime, ControlEvent)> {
        std::mem::take(&mut self.events)
    }

    /// The agent has reported READY (the snapshot point).
    pub fn ready_seen(&self) -> bool {
        self.ready_seen
    }

    fn bad_access(&mut self, what: &str, offset: u64, len: usize) {
        if !self.warned_bad_access {
            self.warned_bad_access = true;
            tracing::warn!(
                offset,
                len,
                "control port {what} is not a 32-bit access at offset 0; ignored (logged once)"
            );
        }
    }

    fn receive(&mut self, now: VirtualTime, word: u32) {
        match Message::decode(word) {
            Ok(message) => {
                tracing::debug!(?message, at = now.as_nanos(), "control message");
                if message.command == Command::Ready {
                    self.ready_seen = true;
                }
                self.events.push((now, ControlEvent::Message(message)));
            }
            Err(error) if !self.warned_bad_word => {
                self.warned_bad_word = true;
                tracing::warn!(%error, "bad control word ignored (logged once)");
            }
            Err(_) => {}
        }
    }
}

impl BusDevice for ControlPort {
    fn read(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
        // Anything but GO reads 0, so a confused agent never mistakes garbage for GO.
        data.fill(0);
        let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) else {
            self.bad_access("read", offset, data.len());
            return;
        };
        if offset != 0 {
            self.bad_access("read", offset, 4);
            return;
        }
        if self.ready_seen && !self.go_held {
            *word = go_word(self.time_limit_secs).to_le_bytes();
        }
    }

    fn write(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset == 0 => self.receive(cx.now, u32::from_le_bytes(word)),
            _ => self.bad_access("write", offset, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;
    use rrr_guest::protocol::GO;

    fn outl(port: &mut ControlPort, now_ns: u64, word: u32) {
        outx(port, now_ns, 0, &word.to_le_bytes());
    }

    fn outx(port: &mut ControlPort, now_ns: u64, offset: u64, data: &[u8]) {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::from_nanos(now_ns),
            irqs: &mut irqs,
        };
        port.write(&mut cx, 0, offset, data);
        assert!(irqs.is_empty());
    }

    fn inl(port: &mut ControlPort) -> u32 {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0xaau8; 4];
        port.read(&mut cx, 0, 0, &mut data);
        u32::from_le_bytes(data)
    }

    fn message(command: Command, argument: u32) -> Message {
        Message { command, argument }
    }

    #[test]
    fn go_only_after_ready() {
        let mut port = ControlPort::new(30);
        assert_eq!(inl(&mut port), 0);
        assert!(!port.ready_seen());
        outl(&mut port, 7, message(Command::Ready, 0).encode());
        assert!(port.ready_seen());
        let go = inl(&mut port);
        assert_eq!(go >> 24, u32::from(GO));
        assert_eq!(go, go_word(30));
    }

    #[test]
    fn held_go_reads_zero_until_released() {
        let mut port = ControlPort::new(5);
        port.hold_go(true);
        outl(&mut port, 0, message(Command::Ready, 0).encode());
        assert_eq!(inl(&mut port), 0);
        port.hold_go(false);
        assert_eq!(inl(&mut port), go_word(5));
    }

    #[test]
    fn events_carry_their_virtual_time() {
        let mut port = ControlPort::new(0);
        outl(&mut port, 100, message(Command::Ready, 0).encode());
        outl(&mut port, 250, message(Command::Started, 42).encode());
        outl(&mut port, 900, message(Command::Exited, 3).encode());
        assert_eq!(
            port.take_events(),
            vec![
                (
                    VirtualTime(100),
                    ControlEvent::Message(message(Command::Ready, 0))
                ),
                (
                    VirtualTime(250),
                    ControlEvent::Message(message(Command::Started, 42))
                ),
                (
                    VirtualTime(900),
                    ControlEvent::Message(message(Command::Exited, 3))
                ),
            ]
        );
        assert!(port.take_events().is_empty());
    }

    #[test]
    fn bad_words_and_widths_are_ignored() {
        let mut port = ControlPort::new(0);
        outl(&mut port, 0, 0xee00_0001);
        outl(&mut port, 0, 0xee00_0002);
        outx(&mut port, 0, 0, &[1]);
        outx(&mut port, 0, 0, &[1, 0]);
        outx(&mut port, 0, 1, &[0, 0, 0]);
        outx(&mut port, 0, 2, &[0, 0]);
        assert!(port.take_events().is_empty());
        assert!(!port.ready_seen());
        // A READY written as bytes is not a READY.
        outx(&mut port, 0, 3, &[Command::Ready as u8]);
        assert!(!port.ready_seen());
        // Narrow reads give zeros, even after GO.
        outl(&mut port, 0, message(Command::Ready, 0).encode());
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut byte = [0xffu8; 1];
        port.read(&mut cx, 0, 3, &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xffu8; 4];
        port.read(&mut cx, 0, 1, &mut word);
        assert_eq!(word, [0; 4]);
    }
}

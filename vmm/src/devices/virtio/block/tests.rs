//! virtio-blk driven through the virtio-mmio registers, over a real qcow2 image from qemu-img.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::disk::test_images::{fingerprint, make_qcow2, pattern, TestImage};
use crate::devices::virtio::disk::{Overlay, Qcow2Image};
use crate::devices::virtio::test_driver::{Driver, MEM_SIZE, R, W};

const DISK_LEN: usize = 1 << 20;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x2_1000;
const STATUS: u64 = 0x3_0000;
/// Written into the status byte before each request, so "untouched" is visible.
const UNTOUCHED: u8 = 0xee;
/// Where [`Setup::assert_still_healthy`] reads; bad writes aim here so a leak would show.
const PROBE_SECTOR: u64 = 200;
const PROBE: std::ops::Range<usize> = 200 * 512..200 * 512 + 4096;

struct Setup {
    image: TestImage,
    before: (Vec<u8>, std::time::SystemTime),
    driver: Driver,
}

fn setup(read_only: bool) -> Setup {
    let image = make_qcow2(pattern(DISK_LEN), &[]);
    let before = fingerprint(&image.qcow2);
    let disk: Box<dyn DiskBackend> = if read_only {
        Box::new(Qcow2Image::open(&image.qcow2).unwrap())
    } else {
        Box::new(Overlay::open_qcow2(&image.qcow2).unwrap())
    };
    let mut driver = Driver::new(Box::new(Block::new(disk)));
    driver.probe();
    Setup {
        image,
        before,
        driver,
    }
}

impl Setup {
    fn header(&self, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.driver
            .mem
            .write_slice(&raw, GuestAddress(HEADER))
            .unwrap();
        self.driver
            .mem
            .write_obj(UNTOUCHED, GuestAddress(STATUS))
            .unwrap();
    }

    fn status(&self) -> u8 {
        self.driver.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.driver
            .mem
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf
    }

    /// Reads `len` bytes at `sector` the way Linux does; returns (used len, status, data).
    fn read(&mut self, sector: u64, len: u32) -> (u32, u8, Vec<u8>) {
        self.header(VIRTIO_BLK_T_IN, sector);
        let used = self
            .driver
            .submit(&[(HEADER, 16, R), (DATA, len, W), (STATUS, 1, W)])
            .expect("request not completed");
        (used.1, self.status(), self.guest_bytes(DATA, len as usize))
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> (u32, u8) {
        self.driver
            .mem
            .write_slice(data, GuestAddress(DATA))
            .unwrap();
        self.header(VIRTIO_BLK_T_OUT, sector);
        let used = self
            .driver
            .submit(&[
                (HEADER, 16, R),
                (DATA, data.len() as u32, R),
                (STATUS, 1, W),
            ])
            .expect("request not completed");
        (used.1, self.status())
    }

    /// After any bad request: the device still serves a good one and the base is untouched.
    fn assert_still_healthy(&mut self) {
        let (used, status, data) = self.read(PROBE_SECTOR, 4096);
        assert_eq!((used, status), (4097, VIRTIO_BLK_S_OK as u8));
        assert!(data == self.image.raw[PROBE]);
        assert_eq!(
            self.driver.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(
            fingerprint(&self.image.qcow2),
            self.before,
            "base image modified"
        );
    }

    fn ack_interrupt(&mut self) {
        let cause = self.driver.read32(VIRTIO_MMIO_INTERRUPT_STATUS);
        self.driver.write32(VIRTIO_MMIO_INTERRUPT_ACK, cause);
    }
}

#[test]
fn config_space_describes_the_disk() {
    let mut s = setup(false);
    let capacity = u64::from(s.driver.read32(0x100)) | u64::from(s.driver.read32(0x104)) << 32;
    assert_eq!(capacity, DISK_LEN as u64 / 512);
    assert_eq!(s.driver.read32(0x10c), SEG_MAX);
    assert_eq!(s.driver.read32(0x114), 512);
    assert_eq!(s.driver.read32(0x200), 0, "past the config reads as zero");
    s.driver.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        s.driver.read32(VIRTIO_MMIO_DEVICE_FEATURES) & 1 << VIRTIO_BLK_F_RO,
        0
    );
}

#[test]
fn read_returns_the_base_image_and_raises_the_line_until_acked() {
    let mut s = setup(false);
    assert!(!s.driver.line_high());
    let (used, status, data) = s.read(3, 8192);
    assert_eq!((used, status), (8193, VIRTIO_BLK_S_OK as u8));
    assert!(data == s.image.raw[3 * 512..3 * 512 + 8192]);
    assert!(s.driver.line_high());
    assert_eq!(
        s.driver.read32(VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    s.ack_interrupt();
    assert!(!s.driver.line_high());
    assert_eq!(s.driver.read32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn writes_land_in_the_overlay_never_in_the_base_file() {
    let mut s = setup(false);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(s.write(10, &data), (1, VIRTIO_BLK_S_OK as u8));
    let (_, status, back) = s.read(10, 4096);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert!(back == data);
    // Unaligned to the overlay's blocks: neighbours keep the base bytes.
    let (_, _, around) = s.read(9, 12 * 512);
    assert!(around[..512] == s.image.raw[9 * 512..10 * 512]);
    assert!(around[512..4608] == data);
    assert!(around[4608..] == s.image.raw[18 * 512..21 * 512]);
    s.assert_still_healthy();
}

#[test]
fn get_id_and_unsupported_requests() {
    let mut s = setup(false);
    s.header(VIRTIO_BLK_T_GET_ID, 0);
    let used = s
        .driver
        .submit(&[(HEADER, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!(used, Some((0, 21)));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        &s.guest_bytes(DATA, 20)[..],
        b"rrr-disk\0\0\0\0\0\0\0\0\0\0\0\0"
    );

    s.header(11, 0); // DISCARD, not offered
    let used = s
        .driver
        .submit(&[(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
    assert_eq!(used, Some((0, 1)));
    assert_eq!(s.status(), VIRTIO_BLK_S_UNSUPP as u8);
    s.assert_still_healthy();
}

/// A request with a usable status byte but bad data: answered IOERR, nothing else written.
fn assert_ioerr(s: &mut Setup, kind: u32, sector: u64, data: (u64, u32, u16)) {
    s.header(kind, sector);
    let used = s.driver.submit(&[(HEADER, 16, R), data, (STATUS, 1, W)]);
    assert_eq!(used, Some((0, 1)), "{kind} {sector} {data:?}");
    assert_eq!(
        s.status(),
        VIRTIO_BLK_S_IOERR as u8,
        "{kind} {sector} {data:?}"
    );
    s.assert_still_healthy();
}

#[test]
fn bad_addresses_and_lengths_fail_only_that_request() {
    let mut s = setup(false);
    // Outside guest memory, overflowing the address space, running past the end of memory.
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, 0, (0xffff_0000_0000, 512, W));
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, 0, (u64::MAX - 100, 4096, W));
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, 0, (MEM_SIZE - 512, 4096, W));
    assert_ioerr(&mut s, VIRTIO_BLK_T_OUT, 0, (MEM_SIZE - 512, 4096, R));
    // Past the disk's end, and a sector number whose byte offset overflows.
    let sectors = DISK_LEN as u64 / 512;
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, sectors - 1, (DATA, 1024, W));
    assert_ioerr(&mut s, VIRTIO_BLK_T_OUT, sectors, (DATA, 512, R));
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, u64::MAX / 256, (DATA, 512, W));
    // Not a whole sector, and data going the wrong way.
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, 0, (DATA, 100, W));
    assert_ioerr(&mut s, VIRTIO_BLK_T_IN, 0, (DATA, 512, R));
    assert_ioerr(&mut s, VIRTIO_BLK_T_OUT, 0, (DATA, 512, W));
}

#[test]
fn a_failed_write_changes_nothing_on_the_disk() {
    let mut s = setup(false);
    // The second segment runs past guest memory: the first must not be written either.
    s.driver
        .mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    s.header(VIRTIO_BLK_T_OUT, PROBE_SECTOR);
    let used = s.driver.submit(&[
        (HEADER, 16, R),
        (DATA, 512, R),
        (MEM_SIZE - 512, 1024, R),
        (STATUS, 1, W),
    ]);
    assert_eq!(used, Some((0, 1)));
    assert_eq!(s.status(), VIRTIO_BLK_S_IOERR as u8);
    s.assert_still_healthy();
}

#[test]
fn chains_without_a_status_byte_are_consumed_silently() {
    let mut s = setup(false);
    // A write whose last descriptor is readable: no status, and nothing written to the disk.
    s.driver
        .mem
        .write_slice(&[0x77; 4096], GuestAddress(DATA))
        .unwrap();
    s.header(VIRTIO_BLK_T_OUT, PROBE_SECTOR);
    assert_eq!(
        s.driver.submit(&[(HEADER, 16, R), (DATA, 4096, R)]),
        Some((0, 0))
    );
    assert_eq!(s.status(), UNTOUCHED);
    s.assert_still_healthy();

    // A zero-length status descriptor, and a status byte outside guest memory.
    for status in [(STATUS, 0, W), (MEM_SIZE + 4096, 1, W), (u64::MAX, 2, W)] {
        s.header(VIRTIO_BLK_T_IN, 0);
        let used = s.driver.submit(&[(HEADER, 16, R), (DATA, 512, W), status]);
        assert_eq!(used, Some((0, 0)), "{status:?}");
        assert_eq!(s.status(), UNTOUCHED);
        s.assert_still_healthy();
    }

    // A header that is too short or that the guest marked device-writable.
    for header in [(HEADER, 8, R), (HEADER, 16, W), (MEM_SIZE - 8, 16, R)] {
        s.header(VIRTIO_BLK_T_IN, 0);
        let used = s.driver.submit(&[header, (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(used, Some((0, 1)), "{header:?}");
        assert_eq!(s.status(), VIRTIO_BLK_S_IOERR as u8);
        s.assert_still_healthy();
    }
}

#[test]
fn descriptor_loops_and_dangling_next_are_consumed() {
    let mut s = setup(false);
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    s.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> ...: virtio-queue stops after QUEUE_SIZE descriptors.
    s.driver.put_descriptor(0, HEADER, 16, R | next, 1);
    s.driver.put_descriptor(1, DATA, 512, W | next, 2);
    s.driver.put_descriptor(2, STATUS, 1, W | next, 1);
    assert_eq!(s.driver.offer(0), Some((0, 0)));
    assert_eq!(s.status(), UNTOUCHED);
    s.assert_still_healthy();

    // A next index past the end of the table.
    s.header(VIRTIO_BLK_T_IN, 0);
    s.driver.put_descriptor(0, HEADER, 16, R | next, 1);
    s.driver.put_descriptor(1, STATUS, 1, W | next, 999);
    assert_eq!(s.driver.offer(0), Some((0, 0)));
    assert_eq!(s.status(), UNTOUCHED);
    s.assert_still_healthy();
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut s = setup(true);
    s.driver.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_ne!(
        s.driver.read32(VIRTIO_MMIO_DEVICE_FEATURES) & 1 << VIRTIO_BLK_F_RO,
        0
    );
    assert_eq!(
        s.write(PROBE_SECTOR, &[0x42; 512]),
        (1, VIRTIO_BLK_S_IOERR as u8)
    );
    s.assert_still_healthy();
}

#[test]
fn a_garbage_available_ring_needs_a_reset() {
    let mut s = setup(false);
    let _ = s.driver.line_high();
    // Head index past the descriptor table: the ring itself is broken.
    assert_eq!(s.driver.offer(300), None);
    assert_ne!(s.driver.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        s.driver.read32(VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert!(s.driver.line_high());
    // Further notifies are ignored until the driver resets and probes again.
    assert_eq!(s.driver.offer(0), None);
    s.driver.probe();
    assert!(!s.driver.line_high(), "reset lowers the line");
    s.assert_still_healthy();
}

#[test]
fn reads_near_and_past_four_gib_are_counted_without_overflow() {
    // virtio 1.2 (2.7.5.2) forbids chains over 2^32 bytes and virtio-queue stops walking one
    // that is: it is refused, nothing written. A chain just under 2^32 bytes is served, and its
    // used length (data plus the status byte) is counted without wrapping.
    use crate::devices::virtio::disk::{Medium, MediumSlot};
    let disk = Medium::new(8 << 30, MediumSlot::new());
    let mut driver = Driver::with_memory(Box::new(Block::new(Box::new(disk))), 3 << 30);
    driver.probe();
    let big = 0x1000_0000;
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    driver.mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    driver
        .mem
        .write_obj(UNTOUCHED, GuestAddress(STATUS))
        .unwrap();
    let half = (2 << 30) + 4096;
    let used = driver
        .submit(&[
            (HEADER, 16, R),
            (big, half, W),
            (big, half, W),
            (STATUS, 1, W),
        ])
        .expect("request not consumed");
    assert_eq!(used.1, 0);
    let status: u8 = driver.mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, UNTOUCHED);

    let (first, second) = (0x8000_0000u32, 0x7fff_fc00u32);
    let used = driver
        .submit(&[
            (HEADER, 16, R),
            (big, first, W),
            (big, second, W),
            (STATUS, 1, W),
        ])
        .expect("request not completed");
    assert_eq!(u64::from(used.1), u64::from(first) + u64::from(second) + 1);
    let status: u8 = driver.mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

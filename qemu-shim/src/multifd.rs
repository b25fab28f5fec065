//! QEMU's multifd channels, as the destination shim writes them: in parsing mode the
//! destination QEMU can load pages over its own multifd channels (`shim recv --qemu-multifd N`)
//! instead of from the main channel's RAM records.
//!
//! Why: a destination QEMU loads the main channel on one thread, and the first write to each
//! page of fresh guest memory is slow (the kernel allocates and clears a transparent huge page;
//! on a VM host, the hypervisor backs it too). On a loaded host that thread is the migration's
//! critical path. QEMU's multifd receive threads read pages straight into guest memory, each on
//! its own CPU, without parsing records.
//!
//! The format (QEMU 7.2, `migration/multifd.c`; all integers big-endian): each channel opens
//! with a 64-byte init (magic, version 1, the destination's 16-byte uuid, the channel id), then
//! carries packets: a header of fixed size (magic, version, flags, pages_alloc, normal_pages,
//! next_packet_size, packet_num, 32 reserved bytes, the RAM block's name in 256 bytes, and 128
//! be64 page offsets of which `normal_pages` count), followed by the pages, uncompressed. A
//! packet with the SYNC flag is a barrier: QEMU's main thread, at each RAM end-of-section
//! marker (EOS) of the main channel, waits until every channel has delivered one, and each
//! channel waits there until it has. So pages before an EOS go on the channels before one SYNC
//! per channel per EOS, and pages after it after that SYNC: the order of writes to a page is
//! kept across sections as it is through the main channel. Zero pages are not in 7.2's packets:
//! they go on the main channel as ZERO records.
//!
//! QEMU 8.1 and later sync differently: not at every EOS but where the main channel says
//! MULTIFD_FLUSH (a RAM record of flag 0x200 alone), unless the machine type is 8.0 or older
//! (`hw_compat_8_0` turns `multifd-flush-after-each-section` back on). The packets are laid out
//! alike (10.x's `zero_pages` count sits in 7.2's reserved bytes, zero here). So the
//! destination shim reads the machine type from the stream's configuration section and, for a
//! newer machine, writes one MULTIFD_FLUSH before the bytes that end a section in which it
//! wrote pages, with one SYNC per channel (`SyncDiscipline`).
//!
//! What the destination QEMU must be told (QMP, before `migrate-incoming`): capability
//! `multifd` on, parameter `multifd-channels` N, `multifd-compression` none. The source QEMU
//! needs none of it. QEMU checks the uuid, so the shim is told the destination's (`-uuid`; the
//! default is QEMU's own default, all zero).

use std::io::{self, Write};
use std::net::Shutdown;

use crossbeam_channel::{Receiver, Sender};
use pagecodec::PAGE_SIZE;

use crate::endpoint::Conn;
use crate::stream::RamBlock;

/// A multifd channel's first four bytes, and every packet's.
pub const MAGIC: u32 = 0x1122_3344;
/// The multifd format version QEMU 7.2 speaks.
pub const VERSION: u32 = 1;
/// Packet flag: a barrier (see the module documentation).
pub const FLAG_SYNC: u32 = 1;
/// Pages one packet may carry: QEMU's 512 KiB packets of 4 KiB target pages. QEMU reads this
/// many offsets in every header, and refuses packets that say they allocated more.
pub const PACKET_PAGES: usize = 128;
/// Bytes of a channel's init message.
pub const INIT_LEN: usize = 64;
/// Bytes of a packet header: six be32, be64 packet number, 32 reserved bytes, the block name,
/// and the offsets.
pub const HEADER_LEN: usize = 6 * 4 + 8 + 32 + 256 + 8 * PACKET_PAGES;
/// Longest RAM block name a header holds (with its terminating NUL).
pub const MAX_BLOCK_NAME: usize = 255;

/// How the destination QEMU syncs its multifd channels with its main channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncDiscipline {
    /// At every RAM end-of-section marker (QEMU up to 8.0, and any QEMU running a machine type
    /// up to 8.0).
    EachSection,
    /// At each MULTIFD_FLUSH record of the main channel ([`FLUSH_RECORD`]): QEMU 8.1 and later
    /// with a machine type of their own.
    FlushRecords,
}

/// The main channel's MULTIFD_FLUSH record: a RAM record with flag 0x200 and nothing else.
pub(crate) const FLUSH_RECORD: [u8; 8] = crate::stream::flags::MULTIFD_FLUSH.to_be_bytes();

/// How a destination QEMU running machine type `machine` (as the stream's configuration
/// section names it) syncs its multifd channels. Versioned x86 machine types (`pc-i440fx-10.0`,
/// `pc-q35-8.1`) say it; unversioned ones (`microvm`, `isapc`) do not, since their QEMU's
/// version decides, which the stream does not carry.
pub(crate) fn sync_discipline(machine: &str) -> Result<SyncDiscipline, String> {
    let version = machine
        .rsplit_once('-')
        .and_then(|(_, v)| v.split_once('.'))
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)));
    match version {
        Some(v) if v >= (8, 1) => Ok(SyncDiscipline::FlushRecords),
        Some(_) => Ok(SyncDiscipline::EachSection),
        None => Err(format!(
            "machine type '{machine}' does not say how the destination QEMU syncs its multifd \
             channels (per section up to QEMU 8.0, per MULTIFD_FLUSH record since): run the \
             destination shim without --qemu-multifd (and the destination QEMU without multifd)"
        )),
    }
}

/// Packets queued per channel before the stream's writer waits: keeps the destination's
/// backlog short (what is queued here is held back from QEMU, like the staging area).
const QUEUE_PACKETS: usize = 2;

/// The destination QEMU's multifd configuration, as its user told the shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuMultifd {
    /// QEMU's `multifd-channels`.
    pub channels: u8,
    /// QEMU's uuid (`-uuid`; all zero without it).
    pub uuid: [u8; 16],
}

impl QemuMultifd {
    /// Parses a uuid written the usual way (`8-4-4-4-12` hexadecimal digits).
    pub fn parse_uuid(text: &str) -> Result<[u8; 16], String> {
        let digits: String = text.chars().filter(|&c| c != '-').collect();
        let groups: Vec<usize> = text.split('-').map(str::len).collect();
        if digits.len() != 32 || groups != [8, 4, 4, 4, 12] {
            return Err(format!(
                "'{text}' is not a uuid (8-4-4-4-12 hexadecimal digits, as QEMU's -uuid takes)"
            ));
        }
        let mut uuid = [0u8; 16];
        for (i, byte) in uuid.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| {
                format!(
                    "'{text}' is not a uuid (8-4-4-4-12 hexadecimal digits, as QEMU's -uuid takes)"
                )
            })?;
        }
        Ok(uuid)
    }
}

/// A channel's init message.
pub fn init_message(uuid: &[u8; 16], id: u8) -> [u8; INIT_LEN] {
    let mut msg = [0u8; INIT_LEN];
    msg[..4].copy_from_slice(&MAGIC.to_be_bytes());
    msg[4..8].copy_from_slice(&VERSION.to_be_bytes());
    msg[8..24].copy_from_slice(uuid);
    msg[24] = id;
    msg
}

/// A packet header: `offsets` are byte offsets in RAM block `block` (empty for a SYNC alone).
pub fn packet_header(flags: u32, block: &str, offsets: &[u64], packet_num: u64) -> Vec<u8> {
    assert!(offsets.len() <= PACKET_PAGES && block.len() <= MAX_BLOCK_NAME);
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC.to_be_bytes());
    h.extend_from_slice(&VERSION.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&(PACKET_PAGES as u32).to_be_bytes());
    h.extend_from_slice(&(offsets.len() as u32).to_be_bytes());
    h.extend_from_slice(&((offsets.len() * PAGE_SIZE) as u32).to_be_bytes());
    h.extend_from_slice(&packet_num.to_be_bytes());
    h.extend_from_slice(&[0u8; 32]);
    let mut name = [0u8; 256];
    name[..block.len()].copy_from_slice(block.as_bytes());
    h.extend_from_slice(&name);
    for &offset in offsets {
        h.extend_from_slice(&offset.to_be_bytes());
    }
    h.resize(HEADER_LEN, 0);
    h
}

/// One packet on its way to a channel: its header and its pages.
pub(crate) struct Packet {
    header: Vec<u8>,
    pages: Vec<u8>,
}

/// Pages collected for the next packet.
struct Building {
    block: usize,
    offsets: Vec<u64>,
    pages: Vec<u8>,
}

/// The destination QEMU's multifd channels, fed by the stream's writer: it hands pages and
/// barriers here; one thread per channel writes them.
pub(crate) struct MultifdOut {
    queues: Vec<Sender<Packet>>,
    /// Page buffers the channels wrote, for the next packets: fresh memory costs a page fault
    /// per page, which on a VM host costs more than the copy into it.
    spare: Receiver<Vec<u8>>,
    /// The channel the next packet goes to (round robin: QEMU's threads load alike).
    next: usize,
    packets: u64,
    building: Option<Building>,
}

impl MultifdOut {
    /// Opens the channels' queues; [`run_channel`] must then run for each one, on its own
    /// thread, with the channel's connection (opened and introduced by [`introduce`]).
    pub(crate) fn new(channels: u8) -> (Self, Vec<ChannelQueue>) {
        let (recycle, spare) = crossbeam_channel::unbounded();
        let (queues, receivers) = (0..channels)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::bounded(QUEUE_PACKETS);
                (
                    tx,
                    ChannelQueue {
                        packets: rx,
                        recycle: recycle.clone(),
                    },
                )
            })
            .unzip();
        (
            Self {
                queues,
                spare,
                next: 0,
                packets: 0,
                building: None,
            },
            receivers,
        )
    }

    /// QEMU's multifd channels fed.
    pub(crate) fn channels(&self) -> usize {
        self.queues.len()
    }

    /// Adds a page at byte `offset` of block `block` (an index into `blocks`). Returns the
    /// bytes this queued for QEMU (a whole packet's when it filled one).
    pub(crate) fn page(
        &mut self,
        blocks: &[RamBlock],
        block: usize,
        offset: u64,
        page: &[u8],
    ) -> Result<u64, String> {
        let mut queued = 0;
        if self.building.as_ref().is_some_and(|b| b.block != block) {
            queued += self.flush(blocks)?;
        }
        let spare = &self.spare;
        let building = self.building.get_or_insert_with(|| Building {
            block,
            offsets: Vec::with_capacity(PACKET_PAGES),
            pages: spare
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(PACKET_PAGES * PAGE_SIZE)),
        });
        building.offsets.push(offset);
        building.pages.extend_from_slice(page);
        if building.offsets.len() == PACKET_PAGES {
            queued += self.flush(blocks)?;
        }
        Ok(queued)
    }

    /// Queues the pages collected so far as a packet (pages must not wait for more: QEMU
    /// loads them while the link carries the next). Returns the bytes queued.
    pub(crate) fn flush(&mut self, blocks: &[RamBlock]) -> Result<u64, String> {
        let Some(building) = self.building.take() else {
            return Ok(0);
        };
        let name = &blocks[building.block].name;
        let header = packet_header(0, name, &building.offsets, self.packets);
        self.packets += 1;
        let bytes = (header.len() + building.pages.len()) as u64;
        let channel = self.next;
        self.next = (self.next + 1) % self.queues.len();
        self.send(
            channel,
            Packet {
                header,
                pages: building.pages,
            },
        )?;
        Ok(bytes)
    }

    /// Queues `count` barriers on every channel, after the pages before them. Returns the bytes
    /// queued.
    pub(crate) fn sync(&mut self, blocks: &[RamBlock], count: u32) -> Result<u64, String> {
        let mut queued = self.flush(blocks)?;
        for _ in 0..count {
            for channel in 0..self.queues.len() {
                let header = packet_header(FLAG_SYNC, "", &[], self.packets);
                self.packets += 1;
                queued += header.len() as u64;
                self.send(
                    channel,
                    Packet {
                        header,
                        pages: Vec::new(),
                    },
                )?;
            }
        }
        Ok(queued)
    }

    fn send(&self, channel: usize, packet: Packet) -> Result<(), String> {
        self.queues[channel].send(packet).map_err(|_| {
            format!("multifd channel {channel} to the destination QEMU stopped writing")
        })
    }
}

/// Opens a multifd channel's connection the way QEMU expects: the init message first.
pub(crate) fn introduce(conn: &mut Conn, multifd: &QemuMultifd, id: u8) -> io::Result<()> {
    conn.write_all(&init_message(&multifd.uuid, id))
}

/// One channel's packets, and the way back for their page buffers.
pub(crate) struct ChannelQueue {
    packets: Receiver<Packet>,
    recycle: Sender<Vec<u8>>,
}

/// Writes one channel's packets to QEMU until the writer drops its queue; then ends the
/// connection (QEMU takes the end of a channel after a whole packet as the end of the
/// migration's multifd traffic). The writer counted the bytes when it queued them.
pub(crate) fn run_channel(mut conn: Conn, queue: ChannelQueue) -> io::Result<()> {
    for mut packet in queue.packets {
        conn.write_all(&packet.header)?;
        conn.write_all(&packet.pages)?;
        if packet.pages.capacity() >= PACKET_PAGES * PAGE_SIZE {
            packet.pages.clear();
            let _ = queue.recycle.send(packet.pages);
        }
    }
    conn.flush()?;
    conn.shutdown(Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_the_layout_qemu_reads() {
        assert_eq!(HEADER_LEN, 1344);
        let h = packet_header(FLAG_SYNC, "pc.ram", &[0x1000, 0x3000], 7);
        assert_eq!(h.len(), HEADER_LEN);
        let be32 = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap());
        assert_eq!(be32(0), MAGIC);
        assert_eq!(be32(4), VERSION);
        assert_eq!(be32(8), FLAG_SYNC);
        assert_eq!(be32(12), PACKET_PAGES as u32);
        assert_eq!(be32(16), 2);
        assert_eq!(be32(20), 2 * PAGE_SIZE as u32);
        assert_eq!(u64::from_be_bytes(h[24..32].try_into().unwrap()), 7);
        assert!(h[32..64].iter().all(|&b| b == 0));
        assert_eq!(&h[64..70], b"pc.ram");
        assert!(h[70..320].iter().all(|&b| b == 0));
        assert_eq!(u64::from_be_bytes(h[320..328].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_be_bytes(h[328..336].try_into().unwrap()), 0x3000);
        assert!(h[336..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_machine_type_says_how_qemu_syncs() {
        for (machine, want) in [
            ("pc-i440fx-7.2", SyncDiscipline::EachSection),
            ("pc-q35-8.0", SyncDiscipline::EachSection),
            ("pc-q35-8.1", SyncDiscipline::FlushRecords),
            ("pc-i440fx-10.0", SyncDiscipline::FlushRecords),
            ("pc-q35-9.2", SyncDiscipline::FlushRecords),
        ] {
            assert_eq!(sync_discipline(machine), Ok(want), "{machine}");
        }
        for machine in ["microvm", "isapc", "pc-i440fx-", "pc-q35-x.y"] {
            let e = sync_discipline(machine).unwrap_err();
            assert!(e.contains("without --qemu-multifd"), "{machine}: {e}");
        }
        assert_eq!(FLUSH_RECORD, [0, 0, 0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn init_messages_carry_the_uuid_and_the_id() {
        let uuid = QemuMultifd::parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        let msg = init_message(&uuid, 3);
        assert_eq!(&msg[..8], &[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        assert_eq!(msg[8], 0x00);
        assert_eq!(msg[23], 0xff);
        assert_eq!(msg[24], 3);
        assert!(msg[25..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_uuids_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "00112233445566778899aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeeg0",
            "0011223-34455-6677-8899-aabbccddeeff",
        ] {
            let e = QemuMultifd::parse_uuid(bad).unwrap_err();
            assert!(e.contains("8-4-4-4-12"), "{e}");
        }
    }

    #[test]
    fn pages_go_round_robin_in_packets_of_one_block_and_barriers_on_every_channel() {
        let (mut out, queues) = MultifdOut::new(2);
        let names: Vec<RamBlock> = ["pc.ram", "vga.vram"]
            .iter()
            .map(|n| RamBlock {
                name: n.to_string(),
                used_length: 1 << 30,
            })
            .collect();
        let page = [7u8; PAGE_SIZE];
        let take = |q: &ChannelQueue| {
            let p = q.packets.try_recv().unwrap();
            let be32 = |at: usize| u32::from_be_bytes(p.header[at..at + 4].try_into().unwrap());
            let name_end = 64 + p.header[64..320].iter().position(|&b| b == 0).unwrap();
            (
                be32(8),
                be32(16),
                String::from_utf8(p.header[64..name_end].to_vec()).unwrap(),
                p.pages.len(),
            )
        };
        for i in 0..PACKET_PAGES as u64 + 1 {
            out.page(&names, 0, i * PAGE_SIZE as u64, &page).unwrap();
        }
        // A full packet went to channel 0; the one page left waits for more.
        assert_eq!(queues[0].packets.len(), 1);
        assert_eq!(queues[1].packets.len(), 0);
        assert_eq!(take(&queues[0]), (0, 128, "pc.ram".into(), 128 * PAGE_SIZE));
        // Another block: the page held goes first, to channel 1.
        out.page(&names, 1, 0, &page).unwrap();
        assert_eq!(queues[1].packets.len(), 1);
        assert_eq!(take(&queues[1]), (0, 1, "pc.ram".into(), PAGE_SIZE));
        let queued = out.sync(&names, 1).unwrap();
        assert_eq!(queued, (HEADER_LEN + PAGE_SIZE + 2 * HEADER_LEN) as u64);
        // The vga.vram page went to channel 0, then each channel got its barrier.
        assert_eq!(take(&queues[0]), (0, 1, "vga.vram".into(), PAGE_SIZE));
        assert_eq!(take(&queues[0]), (FLAG_SYNC, 0, String::new(), 0));
        assert_eq!(take(&queues[1]), (FLAG_SYNC, 0, String::new(), 0));
    }
}

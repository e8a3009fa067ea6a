//! Reading pcap and pcapng captures into TCP and UDP header facts with
//! timestamps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_file::pcap::PcapParser;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgParser};
use pcap_file::{DataLink, PcapError};

use crate::packet::{self, FlowFacts, Link};

/// One captured TCP segment or UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Capture time, from the Unix epoch.
    pub time: Duration,
    pub flow: FlowFacts,
    /// What a UDP datagram carries (an SPA port reads it); empty for TCP.
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Capture {
    pub packets: Vec<Packet>,
    /// Frames that are neither TCP nor UDP over IPv4/IPv6 (ARP, ICMP,
    /// cut-off headers…).
    pub skipped: u64,
    /// Where the file stops making sense, if it does before its end: the
    /// records before this byte offset were read.
    pub cut_at: Option<(usize, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a pcap or pcapng capture", path.display())]
    NotACapture { path: PathBuf },
    #[error("{}: link type {link} is not supported (Ethernet, Linux cooked SLL/SLL2, raw IP are)", path.display())]
    UnsupportedLink { path: PathBuf, link: String },
}

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

pub fn read(path: &Path) -> Result<Capture, CaptureError> {
    let data = std::fs::read(path).map_err(|source| CaptureError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&data, path)
}

/// Parses capture bytes; `path` only names the file in errors.
pub fn parse(data: &[u8], path: &Path) -> Result<Capture, CaptureError> {
    if data.starts_with(&PCAPNG_MAGIC) {
        parse_pcapng(data, path)
    } else {
        parse_pcap(data, path)
    }
}

fn link(datalink: DataLink, path: &Path) -> Result<Link, CaptureError> {
    match datalink {
        DataLink::ETHERNET => Ok(Link::Ethernet),
        DataLink::LINUX_SLL => Ok(Link::LinuxSll),
        DataLink::LINUX_SLL2 => Ok(Link::LinuxSll2),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Ok(Link::RawIp),
        other => Err(CaptureError::UnsupportedLink {
            path: path.to_owned(),
            link: format!("{other:?}"),
        }),
    }
}

impl Capture {
    fn add(&mut self, link: Link, time: Duration, frame: &[u8]) {
        match packet::parse_frame(link, frame) {
            Some(flow) => self.packets.push(Packet {
                time,
                flow,
                payload: packet::frame_payload(link, frame).to_vec(),
            }),
            None => self.skipped += 1,
        }
    }

    /// Records where reading stopped early; a clean end is not a cut.
    fn stop(&mut self, data: &[u8], rest: &[u8], error: PcapError) {
        if !rest.is_empty() {
            let why = match error {
                PcapError::IncompleteBuffer => "the last record is incomplete".to_owned(),
                other => other.to_string(),
            };
            self.cut_at = Some((data.len() - rest.len(), why));
        }
    }
}

fn parse_pcap(data: &[u8], path: &Path) -> Result<Capture, CaptureError> {
    let (mut rest, parser) = PcapParser::new(data).map_err(|_| CaptureError::NotACapture {
        path: path.to_owned(),
    })?;
    let link = link(parser.header().datalink, path)?;
    let mut capture = Capture::default();
    while !rest.is_empty() {
        match parser.next_packet(rest) {
            Ok((next, packet)) => {
                capture.add(link, packet.timestamp, &packet.data);
                rest = next;
            }
            Err(error) => {
                capture.stop(data, rest, error);
                break;
            }
        }
    }
    Ok(capture)
}

fn parse_pcapng(data: &[u8], path: &Path) -> Result<Capture, CaptureError> {
    let (mut rest, mut parser) =
        PcapNgParser::new(data).map_err(|_| CaptureError::NotACapture {
            path: path.to_owned(),
        })?;
    let mut capture = Capture::default();
    while !rest.is_empty() {
        let (next, block) = match parser.next_block(rest) {
            Ok(parsed) => parsed,
            Err(error) => {
                capture.stop(data, rest, error);
                break;
            }
        };
        rest = next;
        let Block::EnhancedPacket(packet) = block else {
            continue;
        };
        let Some(interface) = parser.packet_interface(&packet) else {
            capture.skipped += 1;
            continue;
        };
        let link = link(interface.linktype, path)?;
        // pcap-file reads the raw tick count as nanoseconds; scale it by the
        // interface's resolution (microseconds unless it says otherwise).
        let resolution = interface
            .options
            .iter()
            .find_map(|option| match option {
                InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
                _ => None,
            })
            .unwrap_or(6);
        let ticks = packet.timestamp.as_nanos();
        let ticks_per_second: u128 = if resolution & 0x80 == 0 {
            10u128.pow(u32::from(resolution))
        } else {
            1u128 << (resolution & 0x7f)
        };
        let nanos = ticks * 1_000_000_000 / ticks_per_second;
        let time = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        capture.add(link, time, &packet.data);
    }
    Ok(capture)
}

//! The service a new flow is for. A knock, a close, a grant, a rule, a
//! kernel set element, a saved grant and a fleet record all name ports with
//! [`FlowPort`] (and runs of them with [`PortRange`]), so that what
//! identifies a service is defined once, here.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The transport protocols the gate decides new flows of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// `tcp` or `udp`, as in `2222/udp`, in metrics labels and in scripts.
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    fn parse(text: &str) -> Result<Proto, String> {
        match text {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("protocol \"{text}\" is neither tcp nor udp")),
        }
    }
}

/// `"tcp"` or `"udp"`, as a rotating range's `proto`.
impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Proto::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What identifies the service a new flow is for: its protocol and
/// destination port. TCP 53 and UDP 53 are different ports. A TCP port
/// reads and writes as its bare number, so files from before UDP mean what
/// they meant; a UDP port as `53/udp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowPort {
    proto: Proto,
    number: u16,
}

impl FlowPort {
    /// Slots in a table indexed by [`FlowPort::index`].
    pub const COUNT: usize = Proto::ALL.len() << 16;

    pub const fn new(proto: Proto, number: u16) -> Self {
        FlowPort { proto, number }
    }

    pub const fn tcp(number: u16) -> Self {
        FlowPort::new(Proto::Tcp, number)
    }

    pub const fn udp(number: u16) -> Self {
        FlowPort::new(Proto::Udp, number)
    }

    pub const fn proto(self) -> Proto {
        self.proto
    }

    /// The port number on the wire.
    pub const fn number(self) -> u16 {
        self.number
    }

    /// Where the port sits in a table of [`FlowPort::COUNT`] slots.
    pub const fn index(self) -> usize {
        (self.proto as usize) << 16 | self.number as usize
    }

    /// Every port a flow can be for (port 0 is none), TCP first.
    pub fn all() -> impl Iterator<Item = FlowPort> {
        Proto::ALL
            .into_iter()
            .flat_map(|proto| (1..=u16::MAX).map(move |n| FlowPort::new(proto, n)))
    }

    /// `22`, `22/tcp` or `53/udp`, as in a configuration file or on a
    /// command line.
    pub fn parse(text: &str) -> Result<FlowPort, String> {
        let (number, proto) = split_proto(text)?;
        Ok(FlowPort::new(proto, port_number(number)?))
    }
}

/// `60000-61000/udp` to (`60000-61000`, UDP); no suffix is TCP.
fn split_proto(text: &str) -> Result<(&str, Proto), String> {
    match text.trim().split_once('/') {
        Some((number, proto)) => Ok((number, Proto::parse(proto)?)),
        None => Ok((text.trim(), Proto::Tcp)),
    }
}

fn port_number(text: &str) -> Result<u16, String> {
    let outside = || format!("port {text} is outside 1..65535");
    match text.parse::<i64>() {
        Ok(n) => u16::try_from(n).ok().filter(|&n| n > 0).ok_or_else(outside),
        Err(_) => Err(format!(
            "\"{text}\" is not a port such as 22, 53/udp or 60000-61000/udp"
        )),
    }
}

impl fmt::Display for FlowPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Proto::Tcp => write!(f, "{}", self.number),
            proto => write!(f, "{}/{proto}", self.number),
        }
    }
}

impl Serialize for FlowPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.proto {
            Proto::Tcp => s.serialize_u16(self.number),
            Proto::Udp => s.collect_str(self),
        }
    }
}

/// A port as written: a number (TCP) or a string with the protocol.
#[derive(Deserialize)]
#[serde(untagged)]
enum Written {
    Number(i64),
    Text(String),
}

impl Written {
    fn text(self) -> String {
        match self {
            Written::Number(n) => n.to_string(),
            Written::Text(text) => text,
        }
    }
}

/// `22`, `"22/tcp"` or `"53/udp"`, with what is wrong named in the error.
impl<'de> Deserialize<'de> for FlowPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        FlowPort::parse(&Written::deserialize(d)?.text()).map_err(serde::de::Error::custom)
    }
}

/// Consecutive ports of one protocol, both ends included: an entry of a
/// policy's open ports, a rotating policy's range, a script's knock ports,
/// a kernel set's interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    first: FlowPort,
    last: FlowPort,
}

impl PortRange {
    /// The ports from `first` to `last`; `None` if it ends before it starts
    /// or the ends differ in protocol.
    pub fn new(first: FlowPort, last: FlowPort) -> Option<Self> {
        (first.proto == last.proto && first <= last).then_some(PortRange { first, last })
    }

    pub fn single(port: FlowPort) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// `22`, `53/udp`, `20000-20999` or `60000-61000/udp`.
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let (numbers, proto) = split_proto(text)?;
        let Some((first, last)) = numbers.split_once('-') else {
            return Ok(PortRange::single(FlowPort::new(
                proto,
                port_number(numbers)?,
            )));
        };
        let (first, last) = (
            FlowPort::new(proto, port_number(first.trim())?),
            FlowPort::new(proto, port_number(last.trim())?),
        );
        PortRange::new(first, last)
            .ok_or_else(|| format!("port range \"{}\" ends before it starts", text.trim()))
    }

    pub fn proto(self) -> Proto {
        self.first.proto
    }

    /// The same numbers, of `proto`.
    pub fn with_proto(self, proto: Proto) -> PortRange {
        PortRange {
            first: FlowPort::new(proto, self.first.number),
            last: FlowPort::new(proto, self.last.number),
        }
    }

    pub fn first(self) -> FlowPort {
        self.first
    }

    pub fn last(self) -> FlowPort {
        self.last
    }

    /// How many ports it holds.
    pub fn size(self) -> u32 {
        u32::from(self.last.number - self.first.number) + 1
    }

    pub fn contains(self, port: FlowPort) -> bool {
        self.first <= port && port <= self.last
    }

    pub fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// The port `offset` places after the first, below [`PortRange::size`].
    pub fn nth(self, offset: u32) -> FlowPort {
        debug_assert!(offset < self.size());
        FlowPort::new(self.proto(), self.first.number + offset as u16)
    }

    pub fn iter(self) -> impl Iterator<Item = FlowPort> {
        let proto = self.proto();
        (self.first.number..=self.last.number).map(move |n| FlowPort::new(proto, n))
    }

    /// The numbers alone, as `20000-20999` or `22`, for places that name
    /// the protocol apart (a rule's `-p udp`, a set of UDP ports).
    pub fn numbers(self) -> String {
        match self.first == self.last {
            true => self.first.number.to_string(),
            false => format!("{}-{}", self.first.number, self.last.number),
        }
    }
}

/// `20000-20999`, `22`, `60000-61000/udp` or `53/udp`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.numbers())?;
        match self.proto() {
            Proto::Tcp => Ok(()),
            proto => write!(f, "/{proto}"),
        }
    }
}

/// A single port serialises as a [`FlowPort`] does, so records of
/// single ports read as they did before ranges.
impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.first == self.last {
            true => self.first.serialize(s),
            false => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PortRange::parse(&Written::deserialize(d)?.text()).map_err(serde::de::Error::custom)
    }
}

/// Merges ports into the fewest ranges, per protocol, in order.
pub fn merge(ports: impl IntoIterator<Item = FlowPort>) -> Vec<PortRange> {
    let mut sorted: Vec<FlowPort> = ports.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<PortRange> = Vec::new();
    for port in sorted {
        let extended = ranges.last().and_then(|last| {
            let next = last.last.number.checked_add(1)?;
            (next == port.number).then(|| PortRange::new(last.first, port))?
        });
        match extended {
            Some(longer) => *ranges.last_mut().expect("extended the last") = longer,
            None => ranges.push(PortRange::single(port)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_port_reads_and_writes_as_its_bare_number() {
        let port: FlowPort = serde_json::from_str("22").unwrap();
        assert_eq!(port, FlowPort::tcp(22));
        assert_eq!(serde_json::to_string(&port).unwrap(), "22");
        let error = serde_json::from_str::<FlowPort>("0").unwrap_err();
        assert!(error.to_string().contains("port 0 is outside 1..65535"));
        assert!(serde_json::from_str::<FlowPort>("65536").is_err());
        assert_eq!(FlowPort::parse(" 8080 "), Ok(FlowPort::tcp(8080)));
        assert_eq!(FlowPort::parse("22/tcp"), Ok(FlowPort::tcp(22)));
        assert!(FlowPort::parse("0").is_err());
    }

    #[test]
    fn a_udp_port_names_its_protocol() {
        let port: FlowPort = serde_json::from_str("\"53/udp\"").unwrap();
        assert_eq!(port, FlowPort::udp(53));
        assert_eq!(serde_json::to_string(&port).unwrap(), "\"53/udp\"");
        assert_ne!(FlowPort::udp(53), FlowPort::tcp(53));
        assert_ne!(FlowPort::udp(53).index(), FlowPort::tcp(53).index());
        assert!(FlowPort::udp(u16::MAX).index() < FlowPort::COUNT);
        for (text, message) in [
            ("70000/udp", "port 70000 is outside 1..65535"),
            ("22/sctp", "protocol \"sctp\" is neither tcp nor udp"),
            ("ssh", "\"ssh\" is not a port"),
        ] {
            assert!(
                FlowPort::parse(text).unwrap_err().contains(message),
                "{text}"
            );
        }
        assert_eq!(FlowPort::all().count(), 2 * 65535);
    }

    #[test]
    fn a_range_holds_both_ends() {
        let range = PortRange::new(FlowPort::tcp(20000), FlowPort::tcp(20009)).unwrap();
        assert_eq!(range.size(), 10);
        assert!(range.contains(FlowPort::tcp(20000)) && range.contains(FlowPort::tcp(20009)));
        assert!(!range.contains(FlowPort::tcp(20010)));
        assert!(!range.contains(FlowPort::udp(20005)));
        assert_eq!(range.nth(9), FlowPort::tcp(20009));
        assert_eq!(range.iter().count(), 10);
        assert_eq!(range.to_string(), "20000-20009");
        assert_eq!(PortRange::single(FlowPort::tcp(22)).to_string(), "22");
        assert!(PortRange::new(FlowPort::tcp(2), FlowPort::tcp(1)).is_none());
        assert!(PortRange::new(FlowPort::tcp(1), FlowPort::udp(2)).is_none());
    }

    #[test]
    fn a_range_reads_with_its_protocol() {
        let mosh = PortRange::parse("60000-61000/udp").unwrap();
        assert_eq!(mosh.size(), 1001);
        assert!(mosh.contains(FlowPort::udp(60500)) && !mosh.contains(FlowPort::tcp(60500)));
        assert_eq!(mosh.to_string(), "60000-61000/udp");
        assert_eq!(serde_json::to_string(&mosh).unwrap(), "\"60000-61000/udp\"");
        let single: PortRange = serde_json::from_str("22").unwrap();
        assert_eq!(serde_json::to_string(&single).unwrap(), "22");
        assert!(PortRange::parse("5-3/udp")
            .unwrap_err()
            .contains("ends before it starts"));
    }

    #[test]
    fn merging_joins_neighbours_of_one_protocol() {
        let ports = [1, 2, 3, 7]
            .map(FlowPort::tcp)
            .into_iter()
            .chain([FlowPort::udp(4), FlowPort::udp(3)]);
        let merged: Vec<String> = merge(ports).iter().map(PortRange::to_string).collect();
        assert_eq!(merged, ["1-3", "7", "3-4/udp"]);
    }
}

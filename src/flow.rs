//! The service a new flow is for. A knock, a close, a grant, a rule, a
//! kernel set element, a saved grant and a fleet record all name ports with
//! [`FlowPort`] (and runs of them with [`PortRange`]), so that what
//! identifies a service is defined once, here.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What identifies the service a new flow is for: its destination port.
/// The gate decides TCP only, so a port is a TCP port; its serialised form
/// is the bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowPort {
    number: u16,
}

impl FlowPort {
    /// Slots in a table indexed by [`FlowPort::index`].
    pub const COUNT: usize = 1 << 16;

    pub const fn tcp(number: u16) -> Self {
        FlowPort { number }
    }

    /// The port number on the wire.
    pub const fn number(self) -> u16 {
        self.number
    }

    /// Where the port sits in a table of [`FlowPort::COUNT`] slots.
    pub const fn index(self) -> usize {
        self.number as usize
    }

    /// Every port a flow can be for (port 0 is none).
    pub fn all() -> impl Iterator<Item = FlowPort> {
        (1..=u16::MAX).map(FlowPort::tcp)
    }

    /// `22` as a port, as in a configuration file: 1..65535.
    pub fn parse(text: &str) -> Option<FlowPort> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|&n| n > 0)
            .map(FlowPort::tcp)
    }
}

impl fmt::Display for FlowPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number)
    }
}

impl Serialize for FlowPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.number)
    }
}

/// A port number, 1..65535, with that range named in the error.
impl<'de> Deserialize<'de> for FlowPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(number) if number > 0 => Ok(FlowPort::tcp(number)),
            _ => Err(serde::de::Error::custom(format!(
                "port {n} is outside 1..65535"
            ))),
        }
    }
}

/// Consecutive ports of one protocol, both ends included: a rotating
/// policy's range, a script's knock ports, a kernel set's interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: FlowPort,
    last: FlowPort,
}

impl PortRange {
    /// The ports from `first` to `last`; `None` if it ends before it starts.
    pub fn new(first: FlowPort, last: FlowPort) -> Option<Self> {
        (first <= last).then_some(PortRange { first, last })
    }

    pub fn single(port: FlowPort) -> Self {
        PortRange {
            first: port,
            last: port,
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
        FlowPort::tcp(self.first.number + offset as u16)
    }

    pub fn iter(self) -> impl Iterator<Item = FlowPort> {
        (self.first.number..=self.last.number).map(FlowPort::tcp)
    }
}

/// `20000-20999`, or `22` for a single port.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.first == self.last {
            true => write!(f, "{}", self.first),
            false => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_reads_and_writes_as_its_bare_number() {
        let port: FlowPort = serde_json::from_str("22").unwrap();
        assert_eq!(port, FlowPort::tcp(22));
        assert_eq!(serde_json::to_string(&port).unwrap(), "22");
        let error = serde_json::from_str::<FlowPort>("0").unwrap_err();
        assert!(error.to_string().contains("port 0 is outside 1..65535"));
        assert!(serde_json::from_str::<FlowPort>("65536").is_err());
        assert_eq!(FlowPort::parse(" 8080 "), Some(FlowPort::tcp(8080)));
        assert_eq!(FlowPort::parse("0"), None);
    }

    #[test]
    fn a_range_holds_both_ends() {
        let range = PortRange::new(FlowPort::tcp(20000), FlowPort::tcp(20009)).unwrap();
        assert_eq!(range.size(), 10);
        assert!(range.contains(FlowPort::tcp(20000)) && range.contains(FlowPort::tcp(20009)));
        assert!(!range.contains(FlowPort::tcp(20010)));
        assert_eq!(range.nth(9), FlowPort::tcp(20009));
        assert_eq!(range.iter().count(), 10);
        assert_eq!(range.to_string(), "20000-20009");
        assert_eq!(PortRange::single(FlowPort::tcp(22)).to_string(), "22");
        assert!(PortRange::new(FlowPort::tcp(2), FlowPort::tcp(1)).is_none());
    }
}

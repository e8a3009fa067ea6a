//! The kernel sets of `[rules] offload`, as data and text; pure, like the
//! rest of this module. Three sets (one per address family where the key is
//! an address) let the kernel decide the SYNs that need no engine:
//!
//! - **knock ports**: every knock and close port, fixed, rotating ranges and
//!   script-declared alike, a set per protocol. A new flow to one always
//!   goes to the queue.
//! - **knocking**: sources that knocked within the longest step window,
//!   added and refreshed by the kernel itself; their every SYN is queued, so
//!   progress, resets and close knocks are the engine's as without offload.
//! - **granted** (source, protocol, port) triples, accepted by the kernel: knockq adds
//!   them when a grant opens, with the time it has left, and deletes them
//!   when it ends. Network grants live in an interval set of their own
//!   (nft refuses overlapping intervals, and hosts inside a granted network
//!   may hold grants of their own).

use std::fmt::Write;
use std::net::IpAddr;
use std::time::Duration;

use super::load::Firewall;
use super::{Family, NFT_TABLE};
use crate::config::{Config, Policy};
use crate::engine::{PortMap, PortRole};
use crate::flow::{FlowPort, PortRange, Proto};

/// One of the kernel sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSet {
    /// The knock and close ports of one protocol.
    KnockPorts(Proto),
    Knocking(Family),
    /// (address, port) pairs of address grants.
    Granted(Family),
    /// (network, port) pairs of network grants.
    GrantedNets(Family),
}

impl KernelSet {
    /// Every set, in the order they are created.
    pub const ALL: [KernelSet; 8] = [
        KernelSet::KnockPorts(Proto::Tcp),
        KernelSet::KnockPorts(Proto::Udp),
        KernelSet::Knocking(Family::V4),
        KernelSet::Knocking(Family::V6),
        KernelSet::Granted(Family::V4),
        KernelSet::Granted(Family::V6),
        KernelSet::GrantedNets(Family::V4),
        KernelSet::GrantedNets(Family::V6),
    ];
    pub const GRANTED: [KernelSet; 4] = [
        KernelSet::Granted(Family::V4),
        KernelSet::Granted(Family::V6),
        KernelSet::GrantedNets(Family::V4),
        KernelSet::GrantedNets(Family::V6),
    ];

    /// The set's name in table inet knockq.
    pub fn nft(self) -> &'static str {
        match self {
            KernelSet::KnockPorts(Proto::Tcp) => "knock_ports",
            KernelSet::KnockPorts(Proto::Udp) => "udp_knock_ports",
            KernelSet::Knocking(Family::V4) => "knocking4",
            KernelSet::Knocking(Family::V6) => "knocking6",
            KernelSet::Granted(Family::V4) => "granted4",
            KernelSet::Granted(Family::V6) => "granted6",
            KernelSet::GrantedNets(Family::V4) => "granted_nets4",
            KernelSet::GrantedNets(Family::V6) => "granted_nets6",
        }
    }

    /// The ipset's name.
    pub fn ipset(self) -> &'static str {
        match self {
            KernelSet::KnockPorts(Proto::Tcp) => "knockq-ports",
            KernelSet::KnockPorts(Proto::Udp) => "knockq-udp-ports",
            KernelSet::Knocking(Family::V4) => "knockq-knocking4",
            KernelSet::Knocking(Family::V6) => "knockq-knocking6",
            KernelSet::Granted(Family::V4) => "knockq-granted4",
            KernelSet::Granted(Family::V6) => "knockq-granted6",
            KernelSet::GrantedNets(Family::V4) => "knockq-granted-nets4",
            KernelSet::GrantedNets(Family::V6) => "knockq-granted-nets6",
        }
    }
}

/// Comments on the rules whose counters are the kernel's own decisions.
pub const KERNEL_ACCEPT: &str = "knockq-kernel-accept";
pub const KERNEL_REJECT: &str = "knockq-kernel-reject";
/// A knock whose source the full knocking set could not record.
pub const KNOCKING_FULL: &str = "knockq-knocking-full";

/// What the sets are made of, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    pub knock_ports: Vec<PortRange>,
    /// The knocking set's timeout: the longest step window.
    pub knocking_window: Duration,
    /// The knocking set's size: the engine tracks no more sources.
    pub max_sources: usize,
    /// Granted pairs at most: every tracked source, or network grant, with
    /// every open port.
    pub max_granted: usize,
    pub max_granted_nets: usize,
}

impl Offload {
    pub fn from_config(config: &Config) -> Option<Offload> {
        if !config.rules.offload {
            return None;
        }
        let open = crate::flow::merge(
            config
                .policies
                .iter()
                .flat_map(|p| p.open_ports.iter().flat_map(|range| range.iter())),
        );
        let open_ports: usize = open.iter().map(|range| range.size() as usize).sum();
        let pairs = |grants: usize| grants.saturating_mul(open_ports.max(1)).min(MAX_ELEMENTS);
        Some(Offload {
            knock_ports: knock_ports(&config.policies),
            knocking_window: config.knocking_window(),
            max_sources: config.limits.max_sources.min(MAX_ELEMENTS),
            max_granted: pairs(config.limits.max_sources),
            max_granted_nets: pairs(config.limits.max_prefix_grants),
        })
    }

    /// The knock ports, as `1111, 20000-59999, 7000/udp`.
    pub fn knock_ports_list(&self) -> String {
        let ranges: Vec<String> = self.knock_ports.iter().map(PortRange::to_string).collect();
        ranges.join(", ")
    }

    /// The knock ports of `proto`, as nft set elements: `1111, 20000-59999`.
    fn knock_port_elements(&self, proto: Proto) -> Option<String> {
        let ranges: Vec<String> = self
            .knock_ports
            .iter()
            .filter(|range| range.proto() == proto)
            .map(|range| range.numbers())
            .collect();
        (!ranges.is_empty()).then(|| ranges.join(", "))
    }

    /// The nft declarations of the sets, for the table.
    pub fn nft_sets(&self) -> String {
        let mut out = String::new();
        for proto in Proto::ALL {
            let elements = self
                .knock_port_elements(proto)
                .map(|list| format!(" elements = {{ {list} }};"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "\tset {} {{ type inet_service; flags interval;{elements} }}",
                KernelSet::KnockPorts(proto).nft()
            );
        }
        for family in [Family::V4, Family::V6] {
            let _ = writeln!(
                out,
                "\tset {} {{ type {}; size {}; flags dynamic,timeout; timeout {}s; }}",
                KernelSet::Knocking(family).nft(),
                nft_address(family),
                self.max_sources,
                self.knocking_window.as_secs()
            );
        }
        let granted = [
            (
                KernelSet::Granted as fn(Family) -> KernelSet,
                "timeout",
                self.max_granted,
            ),
            (
                KernelSet::GrantedNets,
                "interval,timeout",
                self.max_granted_nets,
            ),
        ];
        for (set, flags, size) in granted {
            for family in [Family::V4, Family::V6] {
                let _ = writeln!(
                    out,
                    "\tset {} {{ type {} . inet_proto . inet_service; size {size}; flags {flags}; }}",
                    set(family).nft(),
                    nft_address(family),
                );
            }
        }
        out
    }

    /// `ipset -exist restore` input that creates the sets where missing and
    /// fills the knock ports. A set that exists with other settings is
    /// refused by ipset: `knockq rules --remove` first.
    pub fn ipset_create(&self) -> String {
        let mut out = String::new();
        for set in KernelSet::ALL {
            let _ = writeln!(out, "create {} {}", set.ipset(), self.ipset_kind(set));
        }
        out + &self.ipset_knock_ports()
    }

    /// The type and settings of an ipset.
    fn ipset_kind(&self, set: KernelSet) -> String {
        let family = |family| match family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        };
        match set {
            KernelSet::KnockPorts(_) => "bitmap:port range 1-65535".to_owned(),
            KernelSet::Knocking(f) => format!(
                "hash:ip family {} maxelem {} timeout {}",
                family(f),
                self.max_sources,
                self.knocking_window.as_secs()
            ),
            // Timeout 0 is the default: elements without one stay.
            KernelSet::Granted(f) => format!(
                "hash:ip,port family {} maxelem {} timeout 0",
                family(f),
                self.max_granted
            ),
            KernelSet::GrantedNets(f) => format!(
                "hash:net,port family {} maxelem {} timeout 0",
                family(f),
                self.max_granted_nets
            ),
        }
    }

    /// Replaces the knock ports in one step per protocol: filled beside,
    /// then swapped.
    pub fn ipset_knock_ports(&self) -> String {
        let mut out = String::new();
        for proto in Proto::ALL {
            let ports = self
                .knock_ports
                .iter()
                .filter(|range| range.proto() == proto)
                .map(|range| format!("{}-{}", range.first().number(), range.last().number()));
            self.ipset_replace(KernelSet::KnockPorts(proto), ports, &mut out);
        }
        out
    }

    /// Fills a twin of `set` with `elements`, swaps it in and drops the old
    /// contents: the set changes at once, never empty in between.
    fn ipset_replace(
        &self,
        set: KernelSet,
        elements: impl Iterator<Item = String>,
        out: &mut String,
    ) {
        let (name, twin) = (set.ipset(), format!("{}-new", set.ipset()));
        let _ = writeln!(out, "create {twin} {}\nflush {twin}", self.ipset_kind(set));
        for element in elements {
            let _ = writeln!(out, "add {twin} {element}");
        }
        let _ = writeln!(out, "swap {twin} {name}\ndestroy {twin}");
    }

    /// Input that makes the granted sets hold exactly `pairs` and the knock
    /// ports set exactly this configuration's: on start, where the grants
    /// restored from the state file are the truth, and on reload. nft does
    /// it in one transaction, ipset set by set with swaps.
    pub fn reconcile(&self, firewall: Firewall, pairs: &[GrantedPair]) -> String {
        let mut out = String::new();
        match firewall {
            Firewall::Nft => {
                for proto in Proto::ALL {
                    let ports = KernelSet::KnockPorts(proto).nft();
                    let _ = writeln!(out, "flush set inet {NFT_TABLE} {ports}");
                    if let Some(list) = self.knock_port_elements(proto) {
                        let _ = writeln!(out, "add element inet {NFT_TABLE} {ports} {{ {list} }}");
                    }
                }
                for set in KernelSet::GRANTED {
                    let _ = writeln!(out, "flush set inet {NFT_TABLE} {}", set.nft());
                }
                for pair in pairs {
                    let _ = writeln!(out, "add element {}", pair.nft_element(pair.left));
                }
            }
            Firewall::Iptables => {
                out += &self.ipset_knock_ports();
                for set in KernelSet::GRANTED {
                    let elements = pairs
                        .iter()
                        .filter(|pair| pair.set() == set)
                        .filter_map(|pair| pair.ipset_element());
                    self.ipset_replace(set, elements, &mut out);
                }
            }
        }
        out
    }
}

/// ipset's hash types count their size in a u32; nft's sets too.
const MAX_ELEMENTS: usize = 1 << 31;

fn nft_address(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// Every port a SYN to which the engine must see, as the engine's own port
/// map has them: knock and close ports, rotating ranges and the ports
/// scripts declare, as ranges.
pub fn knock_ports(policies: &[Policy]) -> Vec<PortRange> {
    let map = PortMap::new(policies);
    crate::flow::merge(
        FlowPort::all()
            .filter(|&port| !matches!(map.role(port), PortRole::Unrelated | PortRole::Open { .. })),
    )
}

/// One element of a granted set: a source (or network) and a port it may
/// connect to, for the time left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedPair {
    pub src: IpAddr,
    /// A network grant's prefix length; `None` for the address alone.
    pub prefix: Option<u8>,
    pub port: FlowPort,
    /// `None`: until the close knock.
    pub left: Option<Duration>,
}

impl GrantedPair {
    pub fn set(&self) -> KernelSet {
        let family = match self.src {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        };
        match self.prefix {
            None => KernelSet::Granted(family),
            Some(_) => KernelSet::GrantedNets(family),
        }
    }

    /// `inet knockq granted4 { 10.0.0.2 . tcp . 22 timeout 5000ms }`; the time
    /// left in whole milliseconds, never past the grant's own end.
    fn nft_element(&self, left: Option<Duration>) -> String {
        let timeout = match left {
            Some(left) => format!(" timeout {}ms", left.as_millis().max(1)),
            None => String::new(),
        };
        let key = match self.prefix {
            Some(prefix) => format!("{}/{prefix}", self.src),
            None => self.src.to_string(),
        };
        format!(
            "inet {NFT_TABLE} {} {{ {key} . {} . {}{timeout} }}",
            self.set().nft(),
            self.port.proto(),
            self.port.number()
        )
    }

    /// `10.0.0.2,tcp:22 timeout 5`: ipset counts whole seconds, rounded
    /// down so the kernel never outlasts the grant. `None` when less than a
    /// second is left, which ipset would read as "no timeout".
    fn ipset_element(&self) -> Option<String> {
        let timeout = match self.left {
            Some(left) if left.as_secs() == 0 => return None,
            Some(left) => left.as_secs(),
            None => 0,
        };
        Some(format!("{} timeout {timeout}", self.ipset_key()))
    }

    fn ipset_key(&self) -> String {
        match self.prefix {
            Some(prefix) => format!("{}/{prefix},{}", self.src, ipset_port(self.port)),
            None => format!("{},{}", self.src, ipset_port(self.port)),
        }
    }
}

/// A port as ipset's `hash:ip,port` writes it: `tcp:22`, `udp:53`.
fn ipset_port(port: FlowPort) -> String {
    format!("{}:{}", port.proto(), port.number())
}

/// A change to a granted set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChange {
    /// The pair is in the set, with this time left (replacing its old one).
    Put(GrantedPair),
    /// The pair is not in the set, whether it was or not.
    Remove(GrantedPair),
}

/// The input for `nft -f -` or `ipset -exist restore` that makes `changes`,
/// for nft as one transaction. nft's `add` keeps an element's old timeout
/// and its `delete` fails on a missing element, so each change first adds
/// the element (which cannot fail), then deletes it, then (to put it) adds
/// it again with its new timeout.
pub fn changes(firewall: Firewall, changes: &[SetChange]) -> String {
    let mut out = String::new();
    for change in changes {
        let (pair, put) = match change {
            SetChange::Put(pair) => (pair, true),
            SetChange::Remove(pair) => (pair, false),
        };
        match firewall {
            Firewall::Nft => {
                let any = pair.nft_element(Some(Duration::from_secs(1)));
                let _ = writeln!(out, "add element {any}");
                let _ = writeln!(out, "delete element {}", pair.nft_element(None));
                if put {
                    let _ = writeln!(out, "add element {}", pair.nft_element(pair.left));
                }
            }
            Firewall::Iptables => match (put, pair.ipset_element()) {
                (true, Some(element)) => {
                    let _ = writeln!(out, "add {} {element}", pair.set().ipset());
                }
                _ => {
                    let _ = writeln!(out, "del {} {}", pair.set().ipset(), pair.ipset_key());
                }
            },
        }
    }
    out
}

/// For nft, when every change puts a pair: the input that only creates the
/// pairs, failing if any is there already. Deleting an element makes an nft
/// transaction wait for the kernel's RCU grace period (about 15 ms measured
/// here, against 1.5 ms without): a new grant, the common case, tries this
/// first, and only a pair that is there already takes [`changes`].
pub fn creations(firewall: Firewall, changes: &[SetChange]) -> Option<String> {
    if firewall != Firewall::Nft {
        return None;
    }
    let mut out = String::new();
    for change in changes {
        let SetChange::Put(pair) = change else {
            return None;
        };
        let _ = writeln!(out, "create element {}", pair.nft_element(pair.left));
    }
    Some(out)
}

/// Packets counted by the kernel's own decisions, read from rule counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub accepted: u64,
    pub rejected: u64,
    /// Knocks whose source the full knocking set could not record.
    pub knocking_full: u64,
}

impl KernelCounts {
    fn add(&mut self, comment: &str, packets: u64) {
        match comment {
            KERNEL_ACCEPT => self.accepted += packets,
            KERNEL_REJECT => self.rejected += packets,
            KNOCKING_FULL => self.knocking_full += packets,
            _ => {}
        }
    }

    /// From `iptables-save -c` output: `[packets:bytes] -A … --comment C …`.
    pub fn add_iptables_save(&mut self, text: &str) {
        for line in text.lines() {
            let Some((counters, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] "))
            else {
                continue;
            };
            let Some(packets) = counters.split(':').next().and_then(|p| p.parse().ok()) else {
                continue;
            };
            let mut words = rule.split_whitespace();
            while let Some(word) = words.next() {
                if word == "--comment" {
                    if let Some(comment) = words.next() {
                        self.add(comment.trim_matches('"'), packets);
                    }
                }
            }
        }
    }

    /// From `nft -j list chain …`: each rule's comment and counter.
    pub fn add_nft_json(&mut self, json: &str) -> Result<(), serde_json::Error> {
        let listing: serde_json::Value = serde_json::from_str(json)?;
        let items = listing["nftables"].as_array().cloned().unwrap_or_default();
        for rule in items.iter().filter_map(|item| item.get("rule")) {
            let Some(comment) = rule["comment"].as_str() else {
                continue;
            };
            let expressions = rule["expr"].as_array().cloned().unwrap_or_default();
            for expression in expressions {
                if let Some(packets) = expression["counter"]["packets"].as_u64() {
                    self.add(comment, packets);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn offload(policies: &str) -> Offload {
        let text = format!("[rules]\noffload = true\n[limits]\nmax_sources = 1000\n{policies}");
        let config = crate::loader::parse(&text, Path::new("t.toml")).unwrap();
        Offload::from_config(&config).unwrap()
    }

    /// The pair of `src` (a network with `prefix`) and `port`, `left_ms`
    /// milliseconds left, or until closed.
    fn pair(src: &str, prefix: Option<u8>, port: u16, left_ms: Option<u64>) -> GrantedPair {
        GrantedPair {
            src: src.parse().unwrap(),
            prefix,
            port: FlowPort::tcp(port),
            left: left_ms.map(Duration::from_millis),
        }
    }

    const SSH: &str = "[[policy]]\nname = \"ssh\"\nsequence = [2222, 1111]\nopen_ports = [22, 8080]\nclose_port = 1112\nstep_timeout = \"2500ms\"\n";

    #[test]
    fn knock_ports_hold_sequences_and_close_ports_merged() {
        let offload = offload(SSH);
        let range =
            |first, last| PortRange::new(FlowPort::tcp(first), FlowPort::tcp(last)).unwrap();
        assert_eq!(
            offload.knock_ports,
            vec![range(1111, 1112), range(2222, 2222)]
        );
        assert_eq!(offload.knock_ports_list(), "1111-1112, 2222");
        assert_eq!(offload.knocking_window, Duration::from_secs(4));
        assert_eq!(offload.max_granted, 2000, "every source with both ports");
    }

    #[test]
    fn an_nft_put_replaces_the_timeout_and_a_remove_never_fails() {
        let pair = pair("10.0.0.2", None, 22, Some(2500));
        let text = changes(Firewall::Nft, &[SetChange::Put(pair)]);
        assert_eq!(
            text,
            "add element inet knockq granted4 { 10.0.0.2 . tcp . 22 timeout 1000ms }\n\
             delete element inet knockq granted4 { 10.0.0.2 . tcp . 22 }\n\
             add element inet knockq granted4 { 10.0.0.2 . tcp . 22 timeout 2500ms }\n"
        );
        let net = GrantedPair {
            src: "fd00::".parse().unwrap(),
            prefix: Some(56),
            left: None,
            ..pair
        };
        let text = changes(Firewall::Nft, &[SetChange::Remove(net)]);
        assert_eq!(
            text,
            "add element inet knockq granted_nets6 { fd00::/56 . tcp . 22 timeout 1000ms }\n\
             delete element inet knockq granted_nets6 { fd00::/56 . tcp . 22 }\n"
        );
    }

    #[test]
    fn new_nft_pairs_are_only_created() {
        let pair = pair("10.0.0.2", None, 22, None);
        assert_eq!(
            creations(Firewall::Nft, &[SetChange::Put(pair)]).unwrap(),
            "create element inet knockq granted4 { 10.0.0.2 . tcp . 22 }\n"
        );
        assert_eq!(
            creations(
                Firewall::Nft,
                &[SetChange::Put(pair), SetChange::Remove(pair)]
            ),
            None
        );
        assert_eq!(creations(Firewall::Iptables, &[SetChange::Put(pair)]), None);
    }

    #[test]
    fn ipset_timeouts_round_down_and_under_a_second_is_a_removal() {
        let pair = pair("10.0.0.2", None, 22, Some(2500));
        let until_closed = GrantedPair { left: None, ..pair };
        let ending = GrantedPair {
            left: Some(Duration::from_millis(999)),
            ..pair
        };
        let text = changes(
            Firewall::Iptables,
            &[
                SetChange::Put(pair),
                SetChange::Put(until_closed),
                SetChange::Put(ending),
            ],
        );
        assert_eq!(
            text,
            "add knockq-granted4 10.0.0.2,tcp:22 timeout 2\n\
             add knockq-granted4 10.0.0.2,tcp:22 timeout 0\n\
             del knockq-granted4 10.0.0.2,tcp:22\n"
        );
    }

    #[test]
    fn reconciling_ipsets_swaps_in_filled_twins() {
        let pair = pair("10.0.0.0", Some(24), 8080, None);
        let text = offload(SSH).reconcile(Firewall::Iptables, &[pair]);
        assert!(
            text.contains(
                "create knockq-granted-nets4-new hash:net,port family inet maxelem 2048 timeout 0\n\
                 flush knockq-granted-nets4-new\n\
                 add knockq-granted-nets4-new 10.0.0.0/24,tcp:8080 timeout 0\n\
                 swap knockq-granted-nets4-new knockq-granted-nets4\n\
                 destroy knockq-granted-nets4-new\n"
            ),
            "{text}"
        );
        assert!(text.contains("add knockq-ports-new 1111-1112\n"), "{text}");
        let nft = offload(SSH).reconcile(Firewall::Nft, &[pair]);
        assert!(
            nft.starts_with(
                "flush set inet knockq knock_ports\n\
                 add element inet knockq knock_ports { 1111-1112, 2222 }\n\
                 flush set inet knockq udp_knock_ports\n\
                 flush set inet knockq granted4\n"
            ),
            "{nft}"
        );
        assert!(
            nft.ends_with("add element inet knockq granted_nets4 { 10.0.0.0/24 . tcp . 8080 }\n")
        );
    }

    #[test]
    fn counters_are_read_by_comment() {
        let mut counts = KernelCounts::default();
        counts.add_iptables_save(
            "[5:300] -A KNOCKQ-SYN -m set --match-set knockq-granted4 src,dst -m comment --comment knockq-kernel-accept -j ACCEPT\n\
             [2:120] -A KNOCKQ-SYN -m set --match-set knockq-granted-nets4 src,dst -m comment --comment knockq-kernel-accept -j ACCEPT\n\
             [7:420] -A KNOCKQ-SYN -p tcp -m comment --comment knockq-kernel-reject -j REJECT --reject-with icmp-host-prohibited\n\
             [9:540] -A KNOCKQ-SYN -m set --match-set knockq-ports dst -j NFQUEUE --queue-num 0\n",
        );
        counts.add_nft_json(
            r#"{"nftables": [{"metainfo": {}}, {"rule": {"comment": "knockq-knocking-full", "expr": [{"match": {}}, {"counter": {"packets": 3, "bytes": 180}}]}}, {"rule": {"expr": [{"counter": {"packets": 11, "bytes": 1}}]}}]}"#,
        ).unwrap();
        assert_eq!(
            counts,
            KernelCounts {
                accepted: 7,
                rejected: 7,
                knocking_full: 3
            }
        );
    }
}

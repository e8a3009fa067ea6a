//! Firewall rules as data, rendered as iptables-restore or nft text. This
//! module is pure; [`load`] hands the text to `nft` and `iptables-restore`.
//!
//! The verdict path needs three things from the rules: new flows that the
//! host did not accept already go to the queue (every TCP SYN, and UDP
//! datagrams that start a flow to a port a policy uses); a packet the
//! daemon marked with [`REJECT_MARK`] (and sent back with NF_REPEAT) is
//! rejected by a rule placed before the queue rule, a UDP one with ICMP
//! port unreachable as a closed port would answer; nothing marked ever
//! reaches the queue again.

pub mod load;
pub mod sets;

use ipnet::IpNet;

use crate::config::{Config, QueueConfig, RejectWith};
use crate::flow::{PortRange, Proto};
use sets::{KernelSet, Offload, KERNEL_ACCEPT, KERNEL_REJECT, KNOCKING_FULL};
use std::fmt::Write;

/// Mark on a packet the daemon rejects; the packet re-enters the hook.
pub const REJECT_MARK: u32 = 0x6b71_0001;
/// Mark on a packet the daemon accepts, so later tables can recognise it.
pub const ACCEPT_MARK: u32 = 0x6b71_0002;

/// The iptables chain holding knockq's rules.
pub const CHAIN: &str = "KNOCKQ";
/// With offload, the iptables chains deciding new flows, and of those the
/// knocks.
pub const SYN_CHAIN: &str = "KNOCKQ-SYN";
pub const KNOCK_CHAIN: &str = "KNOCKQ-KNOCK";
/// The nftables table holding knockq's rules (family inet).
pub const NFT_TABLE: &str = "knockq";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// IPv4 rules for iptables-restore.
    Iptables,
    /// IPv6 rules for ip6tables-restore.
    Ip6tables,
    /// IPv4 and IPv6 rules for nft -f, in table inet knockq.
    Nft,
    /// With offload, the sets the iptables rules use, for ipset restore.
    Ipset,
}

impl Backend {
    /// IPv4 and IPv6 through the iptables tools.
    pub const IPTABLES: [Backend; 2] = [Backend::Iptables, Backend::Ip6tables];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Ip6tables => "ip6tables",
            Backend::Nft => "nft",
            Backend::Ipset => "ipset",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    queue: QueueConfig,
    reject_with: RejectWith,
    always_allow: Vec<IpNet>,
    /// The UDP ports whose new flows are queued.
    udp_ports: Vec<PortRange>,
    offload: Option<Offload>,
}

/// Whether iptables text carries the jump from INPUT to [`CHAIN`]: loaded
/// with `--noflush` into a table that has the jump already, it must not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Jump {
    Add,
    Present,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Ruleset {
    pub fn from_config(config: &Config) -> Self {
        Ruleset {
            queue: config.queue.clone(),
            reject_with: config.verdict.reject_with,
            always_allow: config.rules.always_allow.clone(),
            udp_ports: config.decided_udp_ports(),
            offload: Offload::from_config(config),
        }
    }

    /// The kernel sets, with `[rules] offload`.
    pub fn offload(&self) -> Option<&Offload> {
        self.offload.as_ref()
    }

    pub fn render(&self, backend: Backend) -> String {
        self.render_to_load(backend, Jump::Add)
    }

    /// The text to load into a running firewall: for iptables without the
    /// jump from INPUT when it is there already, so loading twice adds one.
    fn render_to_load(&self, backend: Backend, jump: Jump) -> String {
        match backend {
            Backend::Iptables => self.iptables(Family::V4, jump),
            Backend::Ip6tables => self.iptables(Family::V6, jump),
            Backend::Nft => self.nft(),
            Backend::Ipset => match &self.offload {
                Some(offload) => format!(
                    "# knockq's sets for ipset -exist restore, used by its iptables rules.\n{}",
                    offload.ipset_create()
                ),
                None => "# knockq uses no ipsets without [rules] offload.\n".to_owned(),
            },
        }
    }

    fn header(&self, loader: &str) -> String {
        let failure = match self.queue.fail_open {
            true => "fail open: new flows pass while knockq is down or its queue is full",
            false => "fail closed: new flows are dropped while knockq is down",
        };
        let offload = match self.offload {
            Some(_) => {
                "# offload: the kernel accepts granted (source, port) pairs and rejects\n\
                 # sources neither knocking nor granted; knocks and knocking sources are queued.\n"
            }
            None => "",
        };
        let udp = match self.udp_ports.is_empty() {
            true => String::new(),
            false => format!(
                "# New UDP flows queued to ports {}; rejected ones get ICMP port unreachable.\n",
                self.udp_ports_list(",")
            ),
        };
        format!(
            "# knockq rules for {loader}: {}, rejected SYNs get {}.\n# {failure}.\n{udp}{offload}",
            self.queue,
            self.reject_with.as_str()
        )
    }

    /// Whether any UDP flow is queued: without, the rules are those of TCP
    /// alone.
    fn queues_udp(&self) -> bool {
        !self.udp_ports.is_empty()
    }

    /// The protocols whose new flows are queued.
    fn protos(&self) -> impl Iterator<Item = Proto> {
        let udp = self.queues_udp();
        Proto::ALL
            .into_iter()
            .filter(move |&proto| proto == Proto::Tcp || udp)
    }

    /// The UDP ports as numbers and ranges, joined by `separator`, with
    /// `-` written as `range` (`:` for iptables).
    fn udp_ports_list(&self, separator: &str) -> String {
        let ports: Vec<String> = self.udp_ports.iter().map(|r| r.numbers()).collect();
        ports.join(separator)
    }

    /// The management networks of one family.
    fn allowed(&self, family: Family) -> impl Iterator<Item = &IpNet> {
        self.always_allow.iter().filter(move |net| match family {
            Family::V4 => matches!(net, IpNet::V4(_)),
            Family::V6 => matches!(net, IpNet::V6(_)),
        })
    }

    fn iptables(&self, family: Family, jump: Jump) -> String {
        let loader = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        let mut out = self.header(loader);
        out.push_str(
            "# A complete minimal filter table; with --noflush the jump to KNOCKQ is\n\
             # appended to an existing INPUT chain instead.\n",
        );
        if self.offload.is_some() {
            out.push_str("# Needs knockq's ipsets: `knockq rules --apply` creates them.\n");
        }
        let reject = format!("-m mark --mark {REJECT_MARK:#x}");
        let mut queue = match self.queue.count {
            1 => format!("--queue-num {}", self.queue.num),
            _ => format!("--queue-balance {}:{}", self.queue.num, self.queue.last()),
        };
        if self.queue.fail_open {
            queue.push_str(" --queue-bypass");
        }
        // With --noflush, declaring a chain empties it: its rules are
        // replaced in the same commit.
        let _ = writeln!(out, "*filter\n:{CHAIN} - [0:0]");
        if self.offload.is_some() {
            let _ = writeln!(out, ":{SYN_CHAIN} - [0:0]\n:{KNOCK_CHAIN} - [0:0]");
        }
        if jump == Jump::Add {
            let _ = writeln!(out, "-A INPUT -j {CHAIN}");
        }
        let _ = writeln!(out, "-A {CHAIN} -i lo -j ACCEPT");
        let _ = writeln!(
            out,
            "-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        );
        for net in self.allowed(family) {
            let _ = writeln!(out, "-A {CHAIN} -s {net} -j ACCEPT");
        }
        let rejections = iptables_rejects(self.reject_with, family, self.queues_udp());
        for (proto, with) in &rejections {
            let _ = writeln!(
                out,
                "-A {CHAIN}{proto} {reject} -j REJECT --reject-with {with}"
            );
        }
        let _ = writeln!(out, "-A {CHAIN} {reject} -j DROP");
        let new_flows = self.iptables_new_flows();
        let Some(offload) = &self.offload else {
            for new_flow in &new_flows {
                let _ = writeln!(out, "{new_flow} -j NFQUEUE {queue}");
            }
            out.push_str("COMMIT\n");
            return out;
        };
        let set = |set: KernelSet| set.ipset();
        let knocking = set(KernelSet::Knocking(family));
        let syn = format!("-A {SYN_CHAIN}");
        let knock = format!("-A {KNOCK_CHAIN}");
        let comment = |text: &str| format!("-m comment --comment {text}");
        for new_flow in &new_flows {
            let _ = writeln!(out, "{new_flow} -j {SYN_CHAIN}");
        }
        // One look at the knock ports; knocks go on in a chain of their own.
        for proto in self.protos() {
            let _ = writeln!(
                out,
                "{syn} -p {proto} -m set --match-set {} dst -j {KNOCK_CHAIN}",
                set(KernelSet::KnockPorts(proto))
            );
        }
        let _ = writeln!(
            out,
            "{syn} -m set --match-set {knocking} src -j NFQUEUE {queue}"
        );
        for granted in [KernelSet::Granted(family), KernelSet::GrantedNets(family)] {
            let _ = writeln!(
                out,
                "{syn} -m set --match-set {} src,dst {} -j ACCEPT",
                set(granted),
                comment(KERNEL_ACCEPT)
            );
        }
        for (proto, with) in &rejections {
            let _ = writeln!(
                out,
                "{syn}{proto} {} -j REJECT --reject-with {with}",
                comment(KERNEL_REJECT)
            );
        }
        let _ = writeln!(out, "{syn} {} -j DROP", comment(KERNEL_REJECT));
        // The knocking set is refreshed by a rule of its own, so a full set
        // never costs a knock; the next rule counts what it could not add.
        let _ = writeln!(
            out,
            "{knock} -j SET --add-set {knocking} src --exist --timeout {}",
            offload.knocking_window.as_secs()
        );
        let _ = writeln!(
            out,
            "{knock} -m set ! --match-set {knocking} src {}",
            comment(KNOCKING_FULL)
        );
        let _ = writeln!(out, "{knock} -j NFQUEUE {queue}\nCOMMIT");
        out
    }

    /// The matches of new flows to decide: TCP SYNs, and UDP datagrams that
    /// start a flow to a decided port, a rule per port or range.
    fn iptables_new_flows(&self) -> Vec<String> {
        let new = "-m conntrack --ctstate NEW";
        let udp = self.udp_ports.iter().map(|range| {
            let ports = range.numbers().replace('-', ":");
            format!("-A {CHAIN} -p udp --dport {ports} {new}")
        });
        std::iter::once(format!("-A {CHAIN} -p tcp --syn {new}"))
            .chain(udp)
            .collect()
    }

    /// The matches of new flows to decide, as [`Ruleset::iptables_new_flows`].
    fn nft_new_flows(&self) -> Vec<String> {
        let new_syn = "tcp flags & (fin | syn | rst | ack) == syn ct state new".to_owned();
        let udp = (!self.udp_ports.is_empty())
            .then(|| format!("udp dport {{ {} }} ct state new", self.udp_ports_list(", ")));
        std::iter::once(new_syn).chain(udp).collect()
    }

    fn nft(&self) -> String {
        let mut out = self.header("nft -f");
        out.push_str("# Replaces table inet knockq as a whole; other tables are left alone.\n");
        let mark = format!("meta mark {REJECT_MARK:#x}");
        let mut queue = match self.queue.count {
            1 => self.queue.num.to_string(),
            _ => format!("{}-{}", self.queue.num, self.queue.last()),
        };
        if self.queue.fail_open {
            queue.push_str(" bypass");
        }
        let sets = self.offload.as_ref().map(Offload::nft_sets);
        let _ = writeln!(
            out,
            "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n\
             {}\tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiif \"lo\" accept\n\
             \t\tct state established,related accept",
            sets.unwrap_or_default()
        );
        for (family, match_) in [(Family::V4, "ip"), (Family::V6, "ip6")] {
            for net in self.allowed(family) {
                let _ = writeln!(out, "\t\t{match_} saddr {net} accept");
            }
        }
        for rule in nft_rejects(self.reject_with, self.queues_udp()) {
            let _ = writeln!(out, "\t\t{mark} {rule}");
        }
        let _ = writeln!(out, "\t\t{mark} counter drop");
        let new_flows = self.nft_new_flows();
        if self.offload.is_none() {
            for new_flow in &new_flows {
                let _ = writeln!(out, "\t\t{new_flow} counter queue num {queue}");
            }
            out.push_str("\t}\n}\n");
            return out;
        }
        for new_flow in &new_flows {
            let _ = writeln!(out, "\t\t{new_flow} jump syn");
        }
        out.push_str("\t}\n\tchain syn {\n");
        // One look at the knock ports; knocks go on in a chain of their own.
        for proto in self.protos() {
            let _ = writeln!(
                out,
                "\t\t{proto} dport @{} jump knock",
                KernelSet::KnockPorts(proto).nft()
            );
        }
        for (family, saddr) in [(Family::V4, "ip"), (Family::V6, "ip6")] {
            let knocking = KernelSet::Knocking(family).nft();
            let _ = writeln!(
                out,
                "\t\t{saddr} saddr @{knocking} counter queue num {queue}"
            );
        }
        for (family, saddr) in [(Family::V4, "ip"), (Family::V6, "ip6")] {
            for granted in [KernelSet::Granted(family), KernelSet::GrantedNets(family)] {
                let _ = writeln!(
                    out,
                    "\t\t{saddr} saddr . meta l4proto . th dport @{} counter accept comment \"{KERNEL_ACCEPT}\"",
                    granted.nft()
                );
            }
        }
        for rule in nft_rejects(self.reject_with, self.queues_udp()) {
            let _ = writeln!(out, "\t\t{rule} comment \"{KERNEL_REJECT}\"");
        }
        let _ = writeln!(
            out,
            "\t\tcounter drop comment \"{KERNEL_REJECT}\"\n\t}}\n\tchain knock {{"
        );
        // As with iptables: the update is a rule of its own, and the next
        // counts the knocks a full knocking set could not record.
        for (family, nfproto, saddr) in [(Family::V4, "ipv4", "ip"), (Family::V6, "ipv6", "ip6")] {
            let knocking = KernelSet::Knocking(family).nft();
            let _ = writeln!(
                out,
                "\t\tmeta nfproto {nfproto} update @{knocking} {{ {saddr} saddr }}\n\
                 \t\tmeta nfproto {nfproto} {saddr} saddr != @{knocking} counter comment \"{KNOCKING_FULL}\""
            );
        }
        let _ = writeln!(out, "\t\tcounter queue num {queue}\n\t}}\n}}");
        out
    }
}

/// The protocol matches and `--reject-with` values, in order: UDP first
/// (when `udp` flows are queued), with port unreachable as a closed UDP
/// port answers, then the configured one. None for plain drop.
fn iptables_rejects(
    reject_with: RejectWith,
    family: Family,
    udp: bool,
) -> Vec<(&'static str, &'static str)> {
    let port_unreachable = match family {
        Family::V4 => "icmp-port-unreachable",
        Family::V6 => "icmp6-port-unreachable",
    };
    let udp = udp.then_some((" -p udp", port_unreachable));
    let configured = match (reject_with, family) {
        (RejectWith::Drop, _) => return vec![],
        (RejectWith::TcpReset, _) => (" -p tcp", "tcp-reset"),
        (RejectWith::IcmpPortUnreachable, _) => ("", port_unreachable),
        (RejectWith::IcmpHostProhibited, Family::V4) => ("", "icmp-host-prohibited"),
        (RejectWith::IcmpAdminProhibited, Family::V4) => ("", "icmp-admin-prohibited"),
        // ICMPv6 has no host-prohibited: administratively prohibited is closest.
        (RejectWith::IcmpHostProhibited | RejectWith::IcmpAdminProhibited, Family::V6) => {
            ("", "icmp6-adm-prohibited")
        }
    };
    udp.into_iter().chain([configured]).collect()
}

/// The nft reject statements, in order, as [`iptables_rejects`].
fn nft_rejects(reject_with: RejectWith, udp: bool) -> Vec<&'static str> {
    let configured = match reject_with {
        RejectWith::Drop => return vec![],
        RejectWith::TcpReset => vec!["meta l4proto tcp counter reject with tcp reset"],
        RejectWith::IcmpHostProhibited => vec![
            "meta nfproto ipv4 counter reject with icmp type host-prohibited",
            "meta nfproto ipv6 counter reject with icmpv6 type admin-prohibited",
        ],
        RejectWith::IcmpPortUnreachable => vec![
            "meta nfproto ipv4 counter reject with icmp type port-unreachable",
            "meta nfproto ipv6 counter reject with icmpv6 type port-unreachable",
        ],
        RejectWith::IcmpAdminProhibited => vec![
            "meta nfproto ipv4 counter reject with icmp type admin-prohibited",
            "meta nfproto ipv6 counter reject with icmpv6 type admin-prohibited",
        ],
    };
    let udp = udp.then_some("meta l4proto udp counter reject with icmpx type port-unreachable");
    udp.into_iter().chain(configured).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn ruleset(extra: &str) -> Ruleset {
        let text = format!(
            "{extra}\n[[policy]]\nname = \"ssh\"\nsequence = [1111, 2222]\nopen_ports = [22]\n"
        );
        Ruleset::from_config(&crate::loader::parse(&text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn balances_over_several_queues() {
        let rules = ruleset("[queue]\nnum = 4\ncount = 2");
        assert!(rules
            .render(Backend::Iptables)
            .contains("-j NFQUEUE --queue-balance 4:5\n"));
        assert!(rules.render(Backend::Nft).contains("queue num 4-5\n"));
    }

    #[test]
    fn drop_has_no_reject_rule_but_still_drops_marked_packets() {
        let rules = ruleset("[verdict]\nreject_with = \"drop\"");
        for backend in [Backend::Iptables, Backend::Ip6tables, Backend::Nft] {
            let text = rules.render(backend);
            assert!(
                !text.contains("reject with") && !text.contains("REJECT"),
                "{text}"
            );
            assert!(
                text.contains("0x6b710001 -j DROP") || text.contains("0x6b710001 counter drop")
            );
        }
    }

    #[test]
    fn management_networks_are_accepted_before_the_queue() {
        let rules = ruleset("[rules]\nalways_allow = [\"192.0.2.0/24\", \"2001:db8::/32\"]");
        let v4 = rules.render(Backend::Iptables);
        assert!(
            v4.contains("-A KNOCKQ -s 192.0.2.0/24 -j ACCEPT\n") && !v4.contains("2001:db8"),
            "{v4}"
        );
        let v6 = rules.render(Backend::Ip6tables);
        assert!(
            v6.contains("-A KNOCKQ -s 2001:db8::/32 -j ACCEPT\n") && !v6.contains("192.0.2"),
            "{v6}"
        );
        let nft = rules.render(Backend::Nft);
        assert!(
            nft.contains("\t\tip saddr 192.0.2.0/24 accept\n\t\tip6 saddr 2001:db8::/32 accept\n"),
            "{nft}"
        );
        for (text, net) in [
            (v4, "192.0.2.0/24"),
            (v6, "2001:db8::/32"),
            (nft, "192.0.2.0/24"),
        ] {
            let queue = text
                .lines()
                .position(|l| l.contains("NFQUEUE") || l.contains("queue num"));
            let allow = text.lines().position(|l| l.contains(net));
            assert!(allow < queue, "{text}");
        }
    }

    #[test]
    fn fail_open_adds_the_queue_bypass() {
        let open = ruleset("[queue]\nfail_open = true");
        assert!(open
            .render(Backend::Iptables)
            .contains("--queue-num 0 --queue-bypass\n"));
        assert!(open.render(Backend::Nft).contains("queue num 0 bypass\n"));
        let closed = ruleset("");
        assert!(!closed.render(Backend::Iptables).contains("bypass"));
        assert!(!closed.render(Backend::Nft).contains("bypass"));
    }

    #[test]
    fn ipv6_rules_use_icmpv6_types() {
        let text = ruleset("").render(Backend::Ip6tables);
        assert!(
            text.contains("--reject-with icmp6-adm-prohibited"),
            "{text}"
        );
        let text = ruleset("[verdict]\nreject_with = \"tcp-reset\"").render(Backend::Ip6tables);
        assert!(text.contains("-p tcp -m mark --mark 0x6b710001 -j REJECT --reject-with tcp-reset"));
    }

    #[test]
    fn marked_packets_are_handled_before_the_queue_rule() {
        for backend in [Backend::Iptables, Backend::Ip6tables, Backend::Nft] {
            let text = ruleset("").render(backend);
            let position = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap();
            let queue_rule = position(if backend == Backend::Nft {
                "queue num"
            } else {
                "NFQUEUE"
            });
            let mark_rule = position("0x6b710001");
            assert!(mark_rule < queue_rule, "{text}");
        }
    }

    #[test]
    fn offload_queues_knocks_and_knocking_sources_before_the_kernel_decides() {
        let rules = ruleset("[rules]\noffload = true");
        for backend in [Backend::Iptables, Backend::Ip6tables, Backend::Nft] {
            let text = rules.render(backend);
            let position = |needle: &str| {
                text.lines()
                    .position(|l| l.contains(needle))
                    .unwrap_or_else(|| panic!("no {needle} in {text}"))
            };
            let nft = backend == Backend::Nft;
            let pick =
                |nft_rule, iptables_rule| position(if nft { nft_rule } else { iptables_rule });
            let order = [
                position("0x6b710001"),
                pick("dport @knock_ports jump knock", "ports dst -j KNOCKQ-KNOCK"),
                pick("saddr @knocking", "-m set --match-set knockq-knocking"),
                position("knockq-kernel-accept"),
                position("knockq-kernel-reject"),
                pick("update @knocking", "-j SET --add-set knockq-knocking"),
                position("knockq-knocking-full"),
                pick("\t\tcounter queue", "-A KNOCKQ-KNOCK -j NFQUEUE"),
            ];
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?} in {text}");
        }
        assert!(rules
            .render(Backend::Ipset)
            .contains("create knockq-granted4 hash:ip,port"));
        assert!(!ruleset("").render(Backend::Nft).contains("set "));
    }

    #[test]
    fn only_udp_ports_a_policy_uses_are_queued_and_rejected_udp_gets_port_unreachable() {
        let text = "[[policy]]\nname = \"wg\"\nsequence = [1111, \"2222/udp\"]\n\
                    open_ports = [22, \"51820/udp\", \"60000-61000/udp\"]\n";
        let rules = Ruleset::from_config(&crate::loader::parse(text, Path::new("t.toml")).unwrap());
        let v4 = rules.render(Backend::Iptables);
        for rule in [
            "-A KNOCKQ -p udp --dport 2222 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 0\n",
            "-A KNOCKQ -p udp --dport 51820 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 0\n",
            "-A KNOCKQ -p udp --dport 60000:61000 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 0\n",
            "-A KNOCKQ -p udp -m mark --mark 0x6b710001 -j REJECT --reject-with icmp-port-unreachable\n",
        ] {
            assert!(v4.contains(rule), "{rule} in {v4}");
        }
        assert_eq!(v4.matches("-p udp --dport").count(), 3, "{v4}");
        let v6 = rules.render(Backend::Ip6tables);
        assert!(
            v6.contains(
                "-p udp -m mark --mark 0x6b710001 -j REJECT --reject-with icmp6-port-unreachable\n"
            ),
            "{v6}"
        );
        let nft = rules.render(Backend::Nft);
        assert!(
            nft.contains(
                "\t\tudp dport { 2222, 51820, 60000-61000 } ct state new counter queue num 0\n"
            ),
            "{nft}"
        );
        assert!(nft.contains("meta mark 0x6b710001 meta l4proto udp counter reject with icmpx type port-unreachable\n"));
        // Under drop, a rejected datagram is dropped like a SYN.
        let drop = text.replace(
            "[[policy]]",
            "[verdict]\nreject_with = \"drop\"\n[[policy]]",
        );
        let rules =
            Ruleset::from_config(&crate::loader::parse(&drop, Path::new("t.toml")).unwrap());
        assert!(!rules.render(Backend::Iptables).contains("REJECT"));
        // Without UDP ports, no UDP rule at all.
        for offload in ["", "[rules]\noffload = true"] {
            for backend in [Backend::Iptables, Backend::Nft] {
                let tcp_only = ruleset(offload).render(backend);
                for udp_rule in ["-p udp", "udp dport", "l4proto udp"] {
                    assert!(!tcp_only.contains(udp_rule), "{tcp_only}");
                }
            }
        }
    }
}

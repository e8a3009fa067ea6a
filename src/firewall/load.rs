//! Loading and removing knockq's rules in the running kernel, through the
//! firewall's own tools (`nft`, `iptables-restore`, `ip6tables-restore`),
//! and finding which backend the kernel can queue from.
//!
//! The tools are run rather than netlink spoken directly: they are what an
//! administrator uses to read the result, and what they accept is the text
//! `knockq rules` prints, so what is printed and what is loaded never differ.

use std::io::ErrorKind::NotFound;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use super::sets::{KernelCounts, KernelSet};
use super::{Backend, Jump, Ruleset, CHAIN, KNOCK_CHAIN, NFT_TABLE, SYN_CHAIN};

/// A firewall knockq can load its rules into, both address families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    /// Table inet knockq, through `nft -f`.
    Nft,
    /// Chain KNOCKQ in the filter tables of iptables and ip6tables.
    Iptables,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot run {tool}: {source}")]
    Run {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} refused knockq's rules: {message}")]
    Refused { tool: &'static str, message: String },
    #[error("{0}; the iptables rules loaded before it were removed again")]
    RolledBack(Box<LoadError>),
}

impl Firewall {
    /// The backends whose text this firewall loads.
    pub fn backends(self) -> &'static [Backend] {
        match self {
            Firewall::Nft => &[Backend::Nft],
            Firewall::Iptables => &Backend::IPTABLES,
        }
    }

    /// nft where this kernel can queue from nftables (CONFIG_NFT_QUEUE),
    /// iptables (xt_NFQUEUE) elsewhere. The kernel is asked: `nft --check`
    /// sends a table with a queue statement through a transaction that is
    /// then aborted, so the probe changes nothing.
    pub fn detect() -> Firewall {
        let probe = format!(
            "table inet {NFT_TABLE}_probe {{\n\tchain probe {{\n\t\t\
             type filter hook input priority filter; policy accept;\n\t\t\
             meta l4proto tcp queue num 0 bypass\n\t}}\n}}\n"
        );
        match run("nft", &["--check", "-f", "-"], Some(&probe)) {
            Ok(out) if out.status.success() => Firewall::Nft,
            _ => Firewall::Iptables,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Firewall::Nft => "nft",
            Firewall::Iptables => "iptables",
        }
    }
}

/// The two tools of one iptables family: the loader and the checker.
fn iptables_tools(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::Iptables => ("iptables-restore", "iptables"),
        Backend::Ip6tables => ("ip6tables-restore", "ip6tables"),
        Backend::Nft | Backend::Ipset => unreachable!("not an iptables family"),
    }
}

/// Loads the rules into `firewall` as one change: nft replaces its table in
/// one transaction; for iptables both families are checked by the kernel
/// first, then each replaces chain KNOCKQ in one commit, and the jump from
/// INPUT is added only where it is missing. The host's own rules are kept.
/// With offload, the ipsets the iptables rules use are created first, where
/// missing, and their knock ports replaced; without it, those of an earlier
/// offload are removed after.
pub fn apply(rules: &Ruleset, firewall: Firewall) -> Result<(), LoadError> {
    match firewall {
        Firewall::Nft => expect_success("nft", &["-f", "-"], &rules.render(Backend::Nft)),
        Firewall::Iptables => {
            if let Some(offload) = rules.offload() {
                update_sets(Firewall::Iptables, &offload.ipset_create())?;
            }
            let texts: Vec<_> = Backend::IPTABLES
                .iter()
                .map(|&backend| {
                    let (loader, checker) = iptables_tools(backend);
                    let jump = run(checker, &["-w", "-C", "INPUT", "-j", CHAIN], None)?;
                    let jump = match jump.status.success() {
                        true => Jump::Present,
                        false => Jump::Add,
                    };
                    let text = rules.render_to_load(backend, jump);
                    expect_success(loader, &["--noflush", "--test"], &text)?;
                    Ok((loader, text))
                })
                .collect::<Result<_, LoadError>>()?;
            for (index, (loader, text)) in texts.iter().enumerate() {
                if let Err(err) = expect_success(loader, &["--noflush"], text) {
                    if index == 0 {
                        return Err(err);
                    }
                    // Rare (the kernel accepted the test): undo the IPv4 part.
                    remove_iptables(Backend::IPTABLES[0])?;
                    return Err(LoadError::RolledBack(Box::new(err)));
                }
            }
            if rules.offload().is_none() {
                for backend in Backend::IPTABLES {
                    remove_syn_chain(backend)?;
                }
                destroy_ipsets()?;
            }
            Ok(())
        }
    }
}

/// Changes the kernel sets with `text`: `nft -f` input (one transaction),
/// or `ipset -exist restore` input.
pub fn update_sets(firewall: Firewall, text: &str) -> Result<(), LoadError> {
    match firewall {
        Firewall::Nft => expect_success("nft", &["-f", "-"], text),
        Firewall::Iptables => expect_success("ipset", &["-exist", "restore"], text),
    }
}

/// The firewall whose offload sets are in the kernel now, if any.
pub fn offload_sets() -> Option<Firewall> {
    let granted = KernelSet::Granted(super::Family::V4);
    let present = |tool, args: &[&str]| run(tool, args, None).is_ok_and(|o| o.status.success());
    if present("nft", &["list", "set", "inet", NFT_TABLE, granted.nft()]) {
        return Some(Firewall::Nft);
    }
    if present("ipset", &["list", "-n", granted.ipset()]) {
        return Some(Firewall::Iptables);
    }
    None
}

/// The packets the kernel decided itself, from the offload rules' counters.
pub fn kernel_counts(firewall: Firewall) -> Result<KernelCounts, LoadError> {
    let mut counts = KernelCounts::default();
    let listed = |tool, args: &[&str]| {
        let out = run(tool, args, None)?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(refused(tool, &out)),
        }
    };
    match firewall {
        // The chains, not the table: its sets may hold a million sources.
        Firewall::Nft => {
            for chain in ["syn", "knock"] {
                let json = listed("nft", &["-j", "list", "chain", "inet", NFT_TABLE, chain])?;
                counts.add_nft_json(&json).map_err(|e| LoadError::Refused {
                    tool: "nft",
                    message: format!("unreadable listing: {e}"),
                })?;
            }
        }
        Firewall::Iptables => {
            for tool in ["iptables-save", "ip6tables-save"] {
                counts.add_iptables_save(&listed(tool, &["-c", "-t", "filter"])?);
            }
        }
    }
    Ok(counts)
}

/// Removes exactly what [`apply`] added, wherever it is; nothing else.
/// Whether there was anything to remove: a firewall whose tools are not
/// installed holds none of knockq's rules.
pub fn remove(firewall: Firewall) -> Result<bool, LoadError> {
    match firewall {
        Firewall::Nft => {
            let Some(listed) = installed(run("nft", &["list", "table", "inet", NFT_TABLE], None))?
            else {
                return Ok(false);
            };
            // nft says ENOENT's message for a table that is not there.
            if !listed.status.success() {
                return match String::from_utf8_lossy(&listed.stderr).contains("No such file") {
                    true => Ok(false),
                    false => Err(refused("nft", &listed)),
                };
            }
            expect_success(
                "nft",
                &["-f", "-"],
                &format!("delete table inet {NFT_TABLE}\n"),
            )?;
            Ok(true)
        }
        Firewall::Iptables => {
            let mut removed = false;
            for backend in Backend::IPTABLES {
                removed |= remove_iptables(backend)?;
            }
            Ok(destroy_ipsets()? || removed)
        }
    }
}

/// Removes the offload chains, once nothing jumps to them.
fn remove_syn_chain(backend: Backend) -> Result<bool, LoadError> {
    let (loader, checker) = iptables_tools(backend);
    if !run(checker, &["-w", "-S", SYN_CHAIN], None)?
        .status
        .success()
    {
        return Ok(false);
    }
    let text = format!(
        "*filter\n-F {SYN_CHAIN}\n-F {KNOCK_CHAIN}\n-X {SYN_CHAIN}\n-X {KNOCK_CHAIN}\nCOMMIT\n"
    );
    expect_success(loader, &["--noflush"], &text)?;
    Ok(true)
}

/// Destroys knockq's ipsets, once no rule uses them.
fn destroy_ipsets() -> Result<bool, LoadError> {
    let Some(listed) = installed(run("ipset", &["list", "-n"], None))? else {
        return Ok(false);
    };
    let names = String::from_utf8_lossy(&listed.stdout);
    let ours: Vec<&str> = names
        .lines()
        .filter(|name| KernelSet::ALL.iter().any(|set| set.ipset() == *name))
        .collect();
    if ours.is_empty() {
        return Ok(false);
    }
    let text: String = ours
        .iter()
        .map(|name| format!("destroy {name}\n"))
        .collect();
    update_sets(Firewall::Iptables, &text)?;
    Ok(true)
}

/// Every jump from INPUT to KNOCKQ, then the chain, in one commit.
fn remove_iptables(backend: Backend) -> Result<bool, LoadError> {
    let (loader, checker) = iptables_tools(backend);
    let Some(input) = installed(run(checker, &["-w", "-S", "INPUT"], None))? else {
        return Ok(false);
    };
    if !input.status.success() {
        return Err(refused(checker, &input));
    }
    let jump = format!("-A INPUT -j {CHAIN}");
    let jumps = String::from_utf8_lossy(&input.stdout)
        .lines()
        .filter(|line| line.trim() == jump)
        .count();
    let chain = run(checker, &["-w", "-S", CHAIN], None)?.status.success();
    if jumps == 0 && !chain {
        return Ok(false);
    }
    let mut text = "*filter\n".to_owned();
    text += &format!("-D INPUT -j {CHAIN}\n").repeat(jumps);
    if chain {
        text += &format!("-F {CHAIN}\n-X {CHAIN}\n");
    }
    text += "COMMIT\n";
    expect_success(loader, &["--noflush"], &text)?;
    remove_syn_chain(backend)?;
    Ok(true)
}

/// The backends whose knockq rules are in the kernel now. A tool that is
/// missing or refuses counts as rules not loaded.
pub fn loaded() -> Vec<Backend> {
    let present = |tool, args: &[&str]| run(tool, args, None).is_ok_and(|o| o.status.success());
    let mut backends = Vec::new();
    if present("nft", &["list", "table", "inet", NFT_TABLE]) {
        backends.push(Backend::Nft);
    }
    for backend in Backend::IPTABLES {
        if present(
            iptables_tools(backend).1,
            &["-w", "-C", "INPUT", "-j", CHAIN],
        ) {
            backends.push(backend);
        }
    }
    backends
}

fn expect_success(tool: &'static str, args: &[&str], input: &str) -> Result<(), LoadError> {
    let out = run(tool, args, Some(input))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(refused(tool, &out)),
    }
}

/// A tool's failure, its stderr on one line.
fn refused(tool: &'static str, out: &Output) -> LoadError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    LoadError::Refused {
        tool,
        message: match message.is_empty() {
            true => out.status.to_string(),
            false => message,
        },
    }
}

/// `None` when the tool is not installed.
fn installed(result: Result<Output, LoadError>) -> Result<Option<Output>, LoadError> {
    match result {
        Err(LoadError::Run { source, .. }) if source.kind() == NotFound => Ok(None),
        other => other.map(Some),
    }
}

fn run(tool: &'static str, args: &[&str], input: Option<&str>) -> Result<Output, LoadError> {
    let failed = |source| LoadError::Run { tool, source };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(match input {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(failed)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // The tools read all of their input before answering; the text is
        // small, so writing it before reading their output cannot block.
        stdin.write_all(text.as_bytes()).map_err(failed)?;
    }
    child.wait_with_output().map_err(failed)
}

//! The end-to-end gate tests again, on the kernel users run: QEMU boots
//! Debian's stock kernel (`linux-image-amd64`) over this machine's own files
//! with virtme-ng, and this test binary runs the gate and rules tests inside
//! it. That kernel has the nft queue statement this machine's may lack.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::util::*;

/// The tests run inside the VM: every gate and rules test, the cases only
/// offload has (with nft sets there), and the packaged unit under systemd,
/// which loads nft rules there.
const FILTERS: &[&str] = &[
    "gate::",
    "udp::",
    "rules::",
    "offload::",
    "deploy::packaged_unit_runs_under_systemd",
];

/// The tests run a second time inside the VM, with `[rules] offload`.
const WITH_OFFLOAD: &[&str] = &["gate::", "udp::", "rules::"];

/// Emulated without KVM, a client command takes hundreds of milliseconds:
/// this test's one-second windows cannot hold there. It runs on the host.
/// The VM runs the gate tests with offload itself.
const SKIPPED: &[&str] = &[
    "gate::step_window_and_grant_timeout",
    "offload::every_gate_test_again_with_offload",
];

/// Longest the VM may run: its tests take one at a time, emulated, 15 to
/// 30 s each on these machines, about 50 of them; only a VM that hangs
/// comes near this.
const VM_TIMEOUT: &str = "2400s";
/// The VM's own scratch directory; its /run is a tmpfs already.
const SCRATCH: &str = "/run/knockq-tests";

/// Tests that must have run, and passed, in the VM.
const MUST_PASS: &[&str] = &[
    "gate::walkthrough_with_nc_nft_both_families",
    "offload::a_close_knock_then_at_once_a_syn_to_an_open_port_with_the_knocking_set_full",
    "offload::a_restart_puts_exactly_the_restored_grants_in_the_kernel",
    "gate::walkthrough_with_nc_iptables",
    "rules::auto_picks_nft_exactly_where_the_kernel_can_queue_from_it",
    "rules::apply_and_remove_keep_the_hosts_own_nft_tables",
    "deploy::packaged_unit_runs_under_systemd",
    "udp::a_wireguard_tunnel_passes_only_after_the_knock",
];

/// Debian's newest stock kernel image in /boot.
fn debian_kernel() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("vmlinuz-") && name.ends_with("-amd64")
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

#[test]
fn gate_tests_on_debians_stock_kernel() {
    let test = "gate_tests_on_debians_stock_kernel";
    if !can_run(test, true, &["vng", "qemu-system-x86_64", "busybox"]) {
        return;
    }
    let Some(kernel) = debian_kernel() else {
        // can_run's rule: under CI a failure, elsewhere a loud skip.
        can_run(
            test,
            true,
            &["/boot/vmlinuz-*-amd64 (apt-get install linux-image-amd64)"],
        );
        return;
    };
    let _alone = Net::machine_alone();
    let exe = std::env::current_exe().unwrap();
    let skips: String = SKIPPED.iter().map(|t| format!(" --skip {t}")).collect();
    let ci = std::env::var("CI").unwrap_or_default();
    // The shared files are read-only, and a Unix socket cannot live on 9p:
    // the tests write to a tmpfs of the VM's own. Not over /tmp, which may
    // hold this very checkout. One test at a time: emulated, two at once
    // starve each other of CPU (the packaged unit's container boots beside
    // a gate test), and the xt_recent comparison once failed that way.
    let script = format!(
        "mkdir -p {SCRATCH} && mount -t tmpfs tmpfs {SCRATCH} && cd {SCRATCH} && \
         TMPDIR={SCRATCH} {IN_VM}=1 CI={ci} {exe} --test-threads 1 {filters}{skips} && \
         TMPDIR={SCRATCH} {IN_VM}=1 {OFFLOAD}=1 CI={ci} {exe} --test-threads 1 {offload}{skips}",
        exe = exe.display(),
        filters = FILTERS.join(" "),
        offload = WITH_OFFLOAD.join(" "),
    );
    let mut vng = Command::new("timeout");
    vng.arg(VM_TIMEOUT)
        .arg("vng")
        .arg("--run")
        .arg(&kernel)
        .args(["--memory", "2G", "--cpus", "2"])
        // Emulated: a /dev/kvm may be there and still not boot a stock
        // kernel (a nested, paravirtual KVM hangs it), and emulation takes
        // a few minutes only.
        .arg("--disable-kvm");
    // The VM's output goes to a file, to follow while it runs (a few
    // minutes); vng reads a terminal's input when it has one: give it none.
    let log_dir = tempfile::TempDir::new().unwrap();
    let log_path = log_dir.path().join("vm.log");
    let log = std::fs::File::create(&log_path).unwrap();
    eprintln!("the VM's output: {}", log_path.display());
    let started = std::time::Instant::now();
    let status = vng
        .arg("--exec")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    let report = std::fs::read_to_string(&log_path).unwrap();
    // The VM's results, in this test's own log.
    let results: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("test ") || l.contains("test result") || l.contains("NOT RUN"))
        .collect();
    eprintln!(
        "in the VM booting {}, {:.0} s:\n{}",
        kernel.display(),
        started.elapsed().as_secs_f64(),
        results.join("\n")
    );
    assert!(status.success(), "the tests failed in the VM:\n{report}");
    for name in MUST_PASS {
        assert!(
            report.contains(&format!("test {name} ... ok")),
            "{name} did not pass in the VM:\n{report}"
        );
    }
    assert!(!report.contains("NOT RUN"), "{report}");
    // The nft walkthrough ran twice: without offload and with it.
    assert_eq!(
        report
            .matches("test gate::walkthrough_with_nc_nft_both_families ... ok")
            .count(),
        2,
        "{report}"
    );
}

//! The Debian package `make deb` builds, and the Ansible role and Puppet
//! class that deploy it, applied for real to a throwaway root: an overlay
//! of this machine's own root in a private mount namespace, so the package
//! installs with dpkg and every write is discarded with the test's
//! directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use tempfile::TempDir;

use crate::util::*;

/// Lintian tags the package keeps (README.md, "Installing", says why).
const KEPT_LINTIAN_TAGS: &[&str] = &["initial-upload-closes-no-bugs"];

/// The package `make deb` built for this version (`make test` builds it).
fn package(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let prefix = format!("knockq_{}-", env!("CARGO_PKG_VERSION"));
    let found = fs::read_dir(&dir).ok().and_then(|entries| {
        entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with("_amd64.deb")
        })
    });
    if found.is_none() {
        // can_run's rule: under CI a failure, elsewhere a loud skip.
        can_run(
            test,
            false,
            &["target/debian/knockq_*.deb (run `make deb`)"],
        );
    }
    found
}

#[test]
fn package_holds_everything_and_lintian_passes() {
    let test = "package_holds_everything_and_lintian_passes";
    if !can_run(test, false, &["dpkg-deb", "lintian"]) {
        return;
    }
    let Some(deb) = package(test) else { return };
    let lintian = run(std::process::Command::new("lintian")
        .args(["--fail-on", "error,warning", "--suppress-tags"])
        .arg(KEPT_LINTIAN_TAGS.join(","))
        .arg(&deb));
    succeeded(lintian, "lintian");

    let listing = text(
        &succeeded(
            run(std::process::Command::new("dpkg-deb").arg("-c").arg(&deb)),
            "dpkg-deb -c",
        )
        .stdout,
    );
    let mut expected = vec![
        "./usr/bin/knockq".to_owned(),
        "./usr/lib/systemd/system/knockq.service".to_owned(),
        "./etc/knockq/knockq.toml".to_owned(),
        "./usr/share/man/man8/knockq.8.gz".to_owned(),
        "./usr/share/bash-completion/completions/knockq".to_owned(),
        "./usr/share/zsh/vendor-completions/_knockq".to_owned(),
        "./usr/share/fish/vendor_completions.d/knockq.fish".to_owned(),
        "./usr/share/doc/knockq/README.md".to_owned(),
        "./usr/share/doc/knockq/copyright".to_owned(),
        "./usr/share/doc/knockq/changelog.Debian.gz".to_owned(),
        "./usr/share/doc/knockq/examples/knockq.toml".to_owned(),
        "./usr/share/doc/knockq/examples/policies/seed.lua".to_owned(),
        "./usr/share/doc/knockq/contrib/grafana-dashboard.json".to_owned(),
        "./usr/share/doc/knockq/contrib/alerts.yml".to_owned(),
    ];
    for sub in [
        "run", "rules", "check", "status", "grant", "revoke", "simulate", "knock", "connect",
        "keygen",
    ] {
        expected.push(format!("./usr/share/man/man8/knockq-{sub}.8.gz"));
    }
    for path in &expected {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} is not in the package:\n{listing}"
        );
    }

    let dir = TempDir::new().unwrap();
    succeeded(
        run(std::process::Command::new("dpkg-deb")
            .arg("-R")
            .arg(&deb)
            .arg(dir.path())),
        "dpkg-deb -R",
    );
    let control = dir.path().join("DEBIAN");
    assert_eq!(
        fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/knockq/knockq.toml\n"
    );
    // Installing must not lock anyone out: no script enables or starts it.
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        if let Ok(body) = fs::read_to_string(control.join(script)) {
            assert!(
                !body.contains("enable") && !body.contains("start"),
                "{script} enables or starts the service:\n{body}"
            );
        }
    }
    let unit =
        fs::read_to_string(dir.path().join("usr/lib/systemd/system/knockq.service")).unwrap();
    assert!(
        unit.contains("ExecStartPre=+/usr/bin/knockq rules --apply"),
        "{unit}"
    );
    // The packaged binary accepts the packaged configuration.
    let check = succeeded(
        run(
            std::process::Command::new(dir.path().join("usr/bin/knockq"))
                .args(["check", "--config"])
                .arg(dir.path().join("etc/knockq/knockq.toml")),
        ),
        "knockq check",
    );
    assert!(text(&check.stdout).contains("policy ssh: knock 1111 2222"));
    let page = run(std::process::Command::new("sh").arg("-c").arg(format!(
        "zcat {}/usr/share/man/man8/knockq-rules.8.gz",
        dir.path().display()
    )));
    assert!(
        text(&page.stdout).contains("\\-\\-apply"),
        "{}",
        text(&page.stdout)
    );
    let bash = fs::read_to_string(
        dir.path()
            .join("usr/share/bash-completion/completions/knockq"),
    )
    .unwrap();
    assert!(bash.contains("simulate") && bash.contains("--close-port"));
}

/// A root to install into and throw away: this machine's root with an
/// overlay on top whose writes land in the test's directory.
struct ThrowawayRoot {
    dir: TempDir,
}

impl ThrowawayRoot {
    fn new() -> ThrowawayRoot {
        let dir = TempDir::new().unwrap();
        for sub in ["upper", "work", "root"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        ThrowawayRoot { dir }
    }

    /// Runs `script` with /bin/sh inside the root, in a mount namespace of
    /// its own, so the overlay never shows outside it.
    fn run(&self, script: &str) -> Output {
        let d = self.dir.path().display();
        // The script goes in a file: no quoting through two shells.
        fs::write(self.dir.path().join("script"), script).unwrap();
        sh(&format!(
            "unshare --mount --propagation private sh -c '\
             mount -t overlay overlay -o lowerdir=/,upperdir={d}/upper,workdir={d}/work {d}/root && \
             for fs in proc sys dev tmp; do mount --rbind /$fs {d}/root/$fs; done && \
             mkdir -p {d}/root{d} && mount --bind {d} {d}/root{d} && \
             chroot {d}/root /bin/sh {d}/script'"
        ))
    }

    /// A copy of `file` in the test's directory, which the root sees at
    /// the same path.
    fn offer(&self, file: &Path) -> PathBuf {
        let copy = self.dir.path().join(file.file_name().unwrap());
        fs::copy(file, &copy).unwrap();
        copy
    }

    /// Boots the root with systemd as PID 1 in a container with a network
    /// namespace of its own (systemd-nspawn), runs `script` there as a
    /// service once the system is up, then powers off. Returns what the
    /// script printed.
    fn boot(&self, script: &str) -> String {
        let d = self.dir.path().display();
        let out = self.dir.path().join("out");
        fs::create_dir_all(&out).unwrap();
        let unit = format!(
            "[Unit]\nAfter=multi-user.target\n[Service]\nType=oneshot\n\
             ExecStart=/bin/sh -c '/bin/sh {d}/out/script > {d}/out/log 2>&1'\n\
             ExecStartPost=/bin/systemctl --no-block poweroff\n"
        );
        fs::write(out.join("script"), script).unwrap();
        fs::write(out.join("boot-test.service"), unit).unwrap();
        succeeded(
            self.run(&format!(
                "cp {d}/out/boot-test.service /etc/systemd/system/ && \
                 ln -sf /etc/systemd/system/boot-test.service \
                 /etc/systemd/system/multi-user.target.wants/boot-test.service"
            )),
            "the boot-time test service",
        );
        // The test's directory at its own path; the checkout, read-only, for
        // the role and the class.
        let boot = sh(&format!(
            "unshare --mount --propagation private sh -c '\
             mount -t overlay overlay -o lowerdir=/,upperdir={d}/upper,workdir={d}/work {d}/root && \
             timeout 300 systemd-nspawn --quiet --directory {d}/root --private-network \
             --register=no --keep-unit --link-journal=no --bind {d} --bind-ro {checkout} \
             --boot --console=pipe < /dev/null'",
            checkout = env!("CARGO_MANIFEST_DIR"),
        ));
        let log = fs::read_to_string(out.join("log")).unwrap_or_default();
        assert!(
            boot.status.success() && !log.is_empty(),
            "the container did not boot and run the test:\n{}\n{}\n{log}",
            text(&boot.stdout),
            text(&boot.stderr)
        );
        log
    }

    /// Writes `contents` to `name` in the test's directory, which the root
    /// sees at the same path.
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, contents).unwrap();
        path
    }

    /// A file as the root sees it.
    fn read(&self, path: &str) -> Option<String> {
        let out = self.run(&format!("cat {path}"));
        out.status.success().then(|| text(&out.stdout))
    }
}

/// What the variables of both tools ask for, as TOML's data model: the
/// rendered file must parse to exactly this.
const SETTINGS: &str = r#"{
  "queue": {"num": 3, "count": 2},
  "verdict": {"reject_with": "tcp-reset"},
  "limits": {"max_sources": 50000},
  "metrics": {"enabled": true, "listen": "127.0.0.1:9731"},
  "policies": [
    {"name": "ssh", "sequence": [1111, 2222], "close_port": 3333,
     "open_ports": [22], "step_timeout": "5s", "grant_timeout": "1h"},
    {"name": "web", "sequence": [4444, 5555, 6666], "open_ports": [80, 443],
     "strict": false, "on_grant": ["/usr/bin/logger", "knockq", "{source}"]}
  ]
}"#;

/// The same settings as written by hand, for `knockq check` to summarise.
const SETTINGS_TOML: &str = r#"[queue]
num = 3
count = 2
[verdict]
reject_with = "tcp-reset"
[limits]
max_sources = 50000
[metrics]
enabled = true
listen = "127.0.0.1:9731"
[[policy]]
name = "ssh"
sequence = [1111, 2222]
close_port = 3333
open_ports = [22]
step_timeout = "5s"
grant_timeout = "1h"
[[policy]]
name = "web"
sequence = [4444, 5555, 6666]
open_ports = [80, 443]
strict = false
on_grant = ["/usr/bin/logger", "knockq", "{source}"]
"#;

/// Checks what a tool left in the root: the package installed, the
/// configuration exactly the settings, the service enabled.
fn check_deployed(root: &ThrowawayRoot, scratch: &Path) -> String {
    succeeded(
        root.run("dpkg-query -W -f '${Status}' knockq | grep -qx 'install ok installed'"),
        "knockq installed",
    );
    let rendered = root
        .read("/etc/knockq/knockq.toml")
        .expect("a configuration");
    let rendered_path = scratch.join("rendered.toml");
    fs::write(&rendered_path, &rendered).unwrap();
    let parsed = succeeded(
        sh(&format!(
            "python3 -c 'import json, sys, tomllib; c = tomllib.load(open(sys.argv[1], \"rb\")); \
             c[\"policies\"] = c.pop(\"policy\"); print(json.dumps(c, sort_keys=True))' {}",
            rendered_path.display()
        )),
        "the rendered configuration is TOML",
    );
    let expected: serde_json::Value = serde_json::from_str(SETTINGS).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(parsed, expected, "rendered:\n{rendered}");
    // `knockq check` in the root summarises it as it does the same settings
    // written by hand.
    let by_hand = scratch.join("by-hand.toml");
    fs::write(&by_hand, SETTINGS_TOML).unwrap();
    let summary = text(
        &succeeded(
            root.run("/usr/bin/knockq check --config /etc/knockq/knockq.toml"),
            "check",
        )
        .stdout,
    );
    let expected = text(
        &succeeded(
            run(knockq().args(["check", "--config"]).arg(&by_hand)),
            "check by hand",
        )
        .stdout,
    );
    assert_eq!(
        summary.replace("/etc/knockq/knockq.toml", "FILE"),
        expected.replace(&by_hand.display().to_string(), "FILE")
    );
    assert!(
        root.run("test -L /etc/systemd/system/multi-user.target.wants/knockq.service")
            .status
            .success(),
        "knockq is not enabled"
    );
    rendered
}

/// Each run of a tool gets files of its own.
fn next_file_number() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How a deployment tool is run: the shell command that applies
/// `policies` with the rest of [`SETTINGS`], and whether its exit status
/// means "applied, with changes".
struct Tool<'a> {
    command: &'a dyn Fn(&serde_json::Value) -> String,
    applied: fn(Option<i32>) -> bool,
}

/// What both tools are put through. Into the root as a chroot: installed,
/// rendered, checked and enabled, not started, and a bad variable leaves
/// the old file. Then booted with systemd: applying starts the gate, and
/// a changed setting reloads it.
fn deploy_and_check(root: &ThrowawayRoot, tool: Tool) {
    let settings: serde_json::Value = serde_json::from_str(SETTINGS).unwrap();
    let policies = &settings["policies"];
    let out = root.run(&(tool.command)(policies));
    assert!(
        (tool.applied)(out.status.code()),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("knockq was enabled but not started"),
        "{}",
        text(&out.stdout)
    );
    let scratch = TempDir::new().unwrap();
    let rendered = check_deployed(root, scratch.path());

    // A bad variable: refused by `knockq check`, the old file stays.
    let mut bad = policies.clone();
    bad[0]["open_ports"] = serde_json::json!([0]);
    let out = root.run(&(tool.command)(&bad));
    assert!(
        !out.status.success() && !(tool.applied)(out.status.code()),
        "a bad policy was deployed"
    );
    assert!(
        text(&out.stdout).contains("failed to validate")
            || text(&out.stderr).contains("Execution of '/usr/bin/knockq check"),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(root.read("/etc/knockq/knockq.toml").unwrap(), rendered);

    let with_grant_timeout = |timeout: &str| {
        let mut changed = policies.clone();
        changed[0]["grant_timeout"] = serde_json::json!(timeout);
        (tool.command)(&changed)
    };
    let log = root.boot(&format!(
        r#"
{}; echo "first: $?"
echo "after the first: $(systemctl is-active knockq)"
{}; echo "second: $?"
for _ in $(seq 100); do
  journalctl -u knockq | grep -q "configuration reloaded" && break
  sleep 0.1
done
echo "after the second: $(systemctl is-active knockq)"
journalctl -u knockq --no-pager
"#,
        with_grant_timeout("2h"),
        with_grant_timeout("3h")
    ));
    for (step, line) in [
        ("first", "after the first: active"),
        ("second", "after the second: active"),
    ] {
        let status: i32 = log
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{step}: ")))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no {step} run in:\n{log}"));
        assert!((tool.applied)(Some(status)), "{step} run: {status}\n{log}");
        assert!(log.contains(line), "{line:?} missing:\n{log}");
    }
    assert!(
        log.contains("configuration reloaded"),
        "the change did not reload knockq:\n{log}"
    );
    assert!(!log.contains("knockq was enabled but not started"), "{log}");
}

#[test]
fn ansible_role_deploys_into_a_throwaway_root() {
    let test = "ansible_role_deploys_into_a_throwaway_root";
    if !can_run(
        test,
        true,
        &["ansible-playbook", "unshare", "systemd-nspawn", "python3"],
    ) {
        return;
    }
    let Some(deb) = package(test) else { return };
    let root = ThrowawayRoot::new();
    let deb = root.offer(&deb);
    let settings: serde_json::Value = serde_json::from_str(SETTINGS).unwrap();
    let roles = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ansible/roles");
    let playbook = root.file("site.yml", "- hosts: localhost\n  roles: [knockq]\n");
    let command = |policies: &serde_json::Value| {
        let vars = serde_json::json!({
            "knockq_package_path": deb,
            "knockq_queue": settings["queue"],
            "knockq_verdict": settings["verdict"],
            "knockq_limits": settings["limits"],
            "knockq_metrics": settings["metrics"],
            "knockq_policies": policies,
        });
        let vars = root.file(
            &format!("vars-{}.json", next_file_number()),
            &vars.to_string(),
        );
        format!(
            "ANSIBLE_ROLES_PATH={} ANSIBLE_NOCOLOR=1 ansible-playbook -i localhost, -c local -e @{} {}",
            roles.display(),
            vars.display(),
            playbook.display()
        )
    };
    deploy_and_check(
        &root,
        Tool {
            command: &command,
            applied: |code| code == Some(0),
        },
    );
}

#[test]
fn puppet_class_deploys_into_a_throwaway_root() {
    let test = "puppet_class_deploys_into_a_throwaway_root";
    if !can_run(
        test,
        true,
        &["puppet", "unshare", "systemd-nspawn", "python3"],
    ) {
        return;
    }
    let Some(deb) = package(test) else { return };
    let root = ThrowawayRoot::new();
    let deb = root.offer(&deb);
    let settings: serde_json::Value = serde_json::from_str(SETTINGS).unwrap();
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/puppet");
    // Puppet's own data syntax is close enough to JSON: `=>` for `:`.
    let puppet_value = |value: &serde_json::Value| value.to_string().replace("\":", "\" =>");
    let command = |policies: &serde_json::Value| {
        let manifest = root.file(
            &format!("site-{}.pp", next_file_number()),
            &format!(
                "class {{ 'knockq':\n  package_path => '{}',\n  queue => {},\n  verdict => {},\n  limits => {},\n  metrics => {},\n  policies => {},\n}}\n",
                deb.display(),
                puppet_value(&settings["queue"]),
                puppet_value(&settings["verdict"]),
                puppet_value(&settings["limits"]),
                puppet_value(&settings["metrics"]),
                puppet_value(policies),
            ),
        );
        format!(
            "puppet apply --detailed-exitcodes --color=false --modulepath {} {}",
            modules.display(),
            manifest.display()
        )
    };
    deploy_and_check(
        &root,
        Tool {
            command: &command,
            // --detailed-exitcodes: 2 means changes were made, none failed.
            applied: |code| code == Some(2),
        },
    );
}

/// The packaged unit under systemd as PID 1, in a container: it starts
/// after READY=1 with its rules loaded, answers on its control socket,
/// reloads keeping grants, keeps its watchdog fed, and stops removing the
/// rules.
#[test]
fn packaged_unit_runs_under_systemd() {
    let test = "packaged_unit_runs_under_systemd";
    if !can_run(
        test,
        true,
        &["systemd-nspawn", "unshare", "/lib/systemd/systemd"],
    ) {
        return;
    }
    let Some(deb) = package(test) else { return };
    let root = ThrowawayRoot::new();
    let deb = root.offer(&deb);
    succeeded(root.run(&format!("dpkg -i {}", deb.display())), "dpkg -i");
    // Installed, the service is neither enabled nor started.
    assert!(!root
        .run("test -e /etc/systemd/system/multi-user.target.wants/knockq.service")
        .status
        .success());
    let log = root.boot(
        r#"
show() { echo "$1: $(systemctl show knockq -p "$2" --value)"; }
systemctl start knockq; echo "start: $?"
show active ActiveState; show sub SubState; show watchdog WatchdogUSec
pid=$(systemctl show knockq -p MainPID --value)
echo "chain: $(iptables -S KNOCKQ | grep -c NFQUEUE) $(ip6tables -S KNOCKQ | grep -c NFQUEUE)"
knockq grant 192.0.2.7 --policy ssh --for 1h
sed -i 's/grant_timeout = "8h"/grant_timeout = "4h"/' /etc/knockq/knockq.toml
systemctl reload knockq; echo "reload: $?"
knockq status | grep -q 192.0.2.7 && echo "grant kept"
# Past the watchdog's 10 s: a daemon that stopped pinging would be killed.
sleep 12
[ "$(systemctl show knockq -p MainPID --value)" = "$pid" ] && echo "same process"
show restarts NRestarts
systemctl stop knockq; echo "stop: $?"
echo "jumps: $(iptables -S INPUT | grep -c KNOCKQ) $(ip6tables -S INPUT | grep -c KNOCKQ)"
iptables -S KNOCKQ >/dev/null 2>&1 || echo "chain removed"
nft list table inet knockq >/dev/null 2>&1 || echo "nft table removed"
journalctl -u knockq --no-pager
"#,
    );
    for line in [
        "start: 0",
        "active: active",
        "sub: running",
        "watchdog: 10s",
        "reload: 0",
        "grant kept",
        "same process",
        "restarts: 0",
        "stop: 0",
        "jumps: 0 0",
        "chain removed",
        "nft table removed",
        "knockq rules are loaded through",
        "configuration reloaded",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
    // What `rules --apply` chose: nft where the kernel queues from it (so
    // always on Debian's kernel in the VM), else both iptables families.
    let nft = log.contains("loaded the nft rules");
    let chains = log.lines().find(|l| l.starts_with("chain: ")).unwrap();
    assert_eq!(nft, nft_can_queue(), "{log}");
    assert!(
        nft || chains == "chain: 1 1",
        "no queue rule: {chains}\n{log}"
    );
    if in_emulated_vm() {
        assert!(nft, "{log}");
    }
}

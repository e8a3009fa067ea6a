//! The command line without root: refused configurations, generated rules,
//! and the systemd unit.

use std::fs;

use crate::util::*;

/// Each refused configuration, and the one line knockq prints for it.
const REFUSED: &[(&str, &str)] = &[
    (
        "port-out-of-range.toml",
        "3: policy[0].sequence[1]: port 70000 is outside 1..65535",
    ),
    (
        "empty-sequence.toml",
        "3: policy[0].sequence: the sequence is empty: give at least one knock port",
    ),
    (
        "knock-port-opened.toml",
        "3: policy[0].sequence: knock port 22 is also an open port of policy \"ssh\"",
    ),
    (
        "knock-port-closes.toml",
        "3: policy[0].sequence: knock port 2222 is also the close port of policy \"ssh\"",
    ),
    (
        "knock-port-shared.toml",
        "8: policy[1].sequence: knock port 1111 is also a knock port of policy \"ssh\"",
    ),
    (
        "duplicate-policy-name.toml",
        "7: policy[1].name: policy name \"ssh\" is already used by policy[0]",
    ),
    (
        "bad-duration.toml",
        "5: policy[0].step_timeout: invalid duration \"ten seconds\": expected number at 0 \
         (examples: \"10s\", \"500ms\", \"8h\")",
    ),
    (
        "unknown-key.toml",
        "3: queue.threads: unknown field `threads`, expected one of `num`, `count`, `fail_open`",
    ),
];

#[test]
fn refused_configurations_name_file_line_and_key_and_exit_2() {
    for (file, message) in REFUSED {
        let path = format!("tests/testdata/{file}");
        for command in ["check", "rules", "run"] {
            let out = run(knockq().args([command, "--config", &path]));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {file}: {stderr}");
            assert_eq!(
                stderr,
                format!("knockq: {path}:{message}\n"),
                "{command} {file}"
            );
            assert!(out.stdout.is_empty(), "{command} {file}: nothing half-done");
        }
    }
}

#[test]
fn a_missing_configuration_is_a_configuration_error() {
    let out = run(knockq().args(["check", "--config", "tests/testdata/no-such-file.toml"]));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "knockq: tests/testdata/no-such-file.toml: cannot read: No such file or directory (os error 2)\n"
    );
}

#[test]
fn check_summarises_the_policies() {
    let out = run(knockq().args(["check", "--config", "examples/knockq.toml"]));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "examples/knockq.toml: valid, 1 policy, queue 0, rejected SYNs get icmp-host-prohibited, \
         at most 1000000 tracked sources\n\
         policy ssh: knock 1111 2222 (at most 10s between knocks, other ports reset) to open 22 8080 \
         for 8h; knock 3333 to close\n"
    );
}

#[test]
fn check_summarises_a_cluster_and_refuses_cluster_scope_without_one() {
    let dir = tempfile::TempDir::new().unwrap();
    let policy = "[[policy]]\nname = \"ssh\"\nsequence = [7301, 4127]\nopen_ports = [22]\nscope = \"cluster\"\n";
    let path = dir.path().join("fleet.toml");
    fs::write(
        &path,
        format!(
            "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nnode = \"bastion-1\"\n{policy}"
        ),
    )
    .unwrap();
    let out = succeeded(
        run(knockq().arg("check").arg("--config").arg(&path)),
        "check",
    );
    let summary = text(&out.stdout);
    assert!(
        summary.contains(
            "cluster: node bastion-1 at http://127.0.0.1:2379 (plain http), keys under /knockq\n"
        ) && summary.contains("to open 22 until closed; shared with the cluster\n"),
        "{summary}"
    );
    fs::write(&path, policy).unwrap();
    let out = run(knockq().arg("check").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "knockq: {}:5: policy[0].scope: scope \"cluster\" needs a [cluster] section naming the etcd endpoints\n",
            path.display()
        )
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = run(knockq().args(["rules", "--backend", "pf"]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(knockq().arg("--version"));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("knockq {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `rules/` holds the rules for the example configuration; they must match
/// what `knockq rules` prints today.
#[test]
fn shipped_rules_match_the_generator() {
    for backend in ["iptables", "ip6tables", "nft"] {
        let out = run(knockq().args([
            "rules",
            "--config",
            "examples/knockq.toml",
            "--backend",
            backend,
        ]));
        assert!(out.status.success());
        let shipped = std::fs::read_to_string(format!("rules/knockq.{backend}")).unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            shipped,
            "rules/knockq.{backend} is out of date: regenerate it with `make rules`"
        );
    }
}

#[test]
fn systemd_unit_verifies() {
    if !can_run("systemd_unit_verifies", false, &["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::TempDir::new().unwrap();
    let unit = std::fs::read_to_string("systemd/knockq.service").unwrap();
    // verify checks that the programs exist: point it at the built binary.
    let unit = unit.replace("/usr/bin/knockq", env!("CARGO_BIN_EXE_knockq"));
    let path = dir.path().join("knockq.service");
    std::fs::write(&path, unit).unwrap();
    let out = run(std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    if !can_run("alert_rules_pass_promtool", false, &["promtool"]) {
        return;
    }
    let out =
        run(std::process::Command::new("promtool").args(["check", "rules", "contrib/alerts.yml"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 11 rules found"));
}

/// The dashboard is valid JSON and charts every family it promises.
#[test]
fn grafana_dashboard_charts_the_metrics() {
    let text = std::fs::read_to_string("contrib/grafana-dashboard.json").unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().iter())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    for family in [
        "knockq_verdicts_total",
        "knockq_grants_total",
        "knockq_active_grants",
        "knockq_tracked_sources",
        "knockq_verdict_duration_seconds_bucket",
        "knockq_queue_dropped_total",
        "knockq_script_errors_total",
        "knockq_hook_runs_total",
        "knockq_cluster_events_total",
        "knockq_cluster_connected",
        "knockq_cluster_backlog",
        "knockq_cluster_propagation_seconds_bucket",
        "knockq_kernel_verdicts_total",
        "knockq_kernel_knocking_set_full_total",
        "knockq_kernel_set_updates_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(family)),
            "no panel shows {family}"
        );
    }
}

/// `systemd-analyze security` rates the unit's exposure 2.0 or lower.
#[test]
fn systemd_unit_exposure_is_low() {
    if !can_run("systemd_unit_exposure_is_low", false, &["systemd-analyze"]) {
        return;
    }
    let out = run(std::process::Command::new("systemd-analyze").args([
        "security",
        "--offline=yes",
        "--no-pager",
        "systemd/knockq.service",
    ]));
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for knockq.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{report}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(level <= 2.0, "exposure {level}:\n{report}");
}

/// Runs a client command; returns the exit code and stderr.
fn client(args: &[&str]) -> (Option<i32>, String) {
    let out = run(knockq().args(args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn keygen_writes_a_private_secret_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ops.key");
    let key = key.to_str().unwrap();
    let (code, _) = client(&["keygen", key]);
    assert_eq!(code, Some(0));
    let mode = std::fs::metadata(key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret = std::fs::read_to_string(key).unwrap();
    let (code, stderr) = client(&["keygen", key]);
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        format!("knockq: secret file {key}: File exists (os error 17)\n")
    );
    assert_eq!(
        std::fs::read_to_string(key).unwrap(),
        secret,
        "the key was kept"
    );
}

/// A client command refused with exit status 2 and this one line.
fn refused(args: &[&str], expected: impl AsRef<str>) {
    let (code, stderr) = client(args);
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr, expected.as_ref(), "{args:?}");
}

#[test]
fn bad_client_input_is_one_line_and_exit_2() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let good = file(
        "client.toml",
        "[profile.lab]\nhost = \"10.9.0.1\"\nsequence = [1111, 2222]\n",
    );
    refused(
        &["knock", "--profile", "prod", "--client-config", &good],
        format!("knockq: {good}: no profile \"prod\" (it has: lab)\n"),
    );

    let malformed = file(
        "malformed.toml",
        "[profile.lab]\nhost = \"10.9.0.1\"\nsequence = [1111, 0]\n",
    );
    refused(
        &["knock", "--profile", "lab", "--client-config", &malformed],
        format!("knockq: {malformed}:3: profile.lab.sequence[1]: port 0 is outside 1..65535\n"),
    );

    let missing = format!("{d}/none.toml");
    refused(
        &["connect", "--profile", "lab", "--client-config", &missing],
        format!("knockq: {missing}: cannot read: No such file or directory (os error 2)\n"),
    );

    let rotating = |secret: &str| {
        format!(
            "[profile.ops]\nhost = \"10.9.0.1\"\n[profile.ops.rotating]\n\
             secret_file = \"{secret}\"\nports = \"20000-59999\"\n"
        )
    };
    let key = format!("{d}/ops.key");
    std::fs::write(&key, [b'k'; 40]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let too_open = file("too-open.toml", &rotating("ops.key"));
    refused(
        &["knock", "--profile", "ops", "--client-config", &too_open],
        format!(
            "knockq: {too_open}:4: profile.ops.rotating.secret_file: secret file {key} can be \
             read or written by group or others (mode 0644): run chmod 600 on it\n"
        ),
    );

    let unreadable = file("unreadable.toml", &rotating("/nonexistent/ops.key"));
    refused(
        &["knock", "--profile", "ops", "--client-config", &unreadable],
        format!(
            "knockq: {unreadable}:4: profile.ops.rotating.secret_file: secret file \
             /nonexistent/ops.key: No such file or directory (os error 2)\n"
        ),
    );

    refused(
        &["knock", "10.9.0.1"],
        "knockq: give the ports to knock, or a --profile\n",
    );
}

#[test]
fn a_script_that_does_not_compile_is_one_line_with_its_file_and_line_and_exit_2() {
    let path = "tests/testdata/scripts/broken.toml";
    for command in ["check", "rules", "run"] {
        let out = run(knockq().args([command, "--config", path]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert_eq!(
            stderr,
            "knockq: tests/testdata/scripts/broken.lua:4: Expected identifier when parsing expression, got 'end'\n",
            "{command}"
        );
        assert!(out.stdout.is_empty(), "{command}: nothing half-done");
    }
    let out = run(knockq().args([
        "check",
        "--config",
        "tests/testdata/scripts/port-taken.toml",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "knockq: tests/testdata/scripts/port-taken.toml:11: policy[1].script.knock_ports: \
         knock port 2222 is also a knock port of policy \"ssh\"\n"
    );
}

#[test]
fn check_compiles_scripts_and_names_their_ports() {
    let out = run(knockq().args(["check", "--config", "examples/policies/seed.toml"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(
            "policy ssh: knock script examples/policies/seed.lua on 1111 2222 3333 (at most 10s between knocks) \
             to open 22 8080 for 8h; script compiled, budget 1ms a call, 16 MiB"
        ),
        "{summary}"
    );
}

#[test]
fn keygen_spa_writes_a_users_keys_and_the_stanzas_that_use_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = run(knockq().args(["keygen", "--spa", "alice"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for file in ["alice.key", "alice.hmac"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let printed = text(&out.stdout);
    let key = std::fs::read_to_string(dir.path().join("alice.key")).unwrap();
    assert!(
        printed.contains(&format!("KEY_BASE64          {}", key.trim_end())),
        "{printed}"
    );
    // The gate's stanza, pasted under a policy, is a configuration.
    let stanza: String = printed
        .split("\n\n")
        .find(|part| part.contains("[[policy.spa.user]]"))
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    let config = dir.path().join("knockq.toml");
    std::fs::write(
        &config,
        format!("[[policy]]\nname = \"spa\"\nopen_ports = [22]\n[policy.spa]\n{stanza}"),
    )
    .unwrap();
    let out = run(knockq().arg("check").arg("--config").arg(&config));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Never over an existing key.
    let out = run(knockq().args(["keygen", "--spa", "alice"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("alice.key")).unwrap(),
        key
    );
}

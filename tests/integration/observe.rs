//! Watching and steering a running gate: the scrape endpoint (checked by
//! promtool and scraped by a real Prometheus), JSON logs, and the control
//! socket.

use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::util::*;

const METRICS_PORT: u16 = 9724;

#[test]
fn scrape_after_a_knock_has_exact_values_and_passes_promtool() {
    let test = "scrape_after_a_knock_has_exact_values_and_passes_promtool";
    if !can_run_end_to_end(test) || !can_run(test, true, &["promtool"]) {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let _gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let src = CLIENTS4[0];
    assert!(net.connect(src, 22).is_rejected());
    net.knock(src, &[1111, 2222]);
    assert_eq!(net.connect(src, 22), Reply::Open);
    net.knock(src, &[3333]);

    let (head, body) = net.http_get(METRICS_PORT, "/metrics");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    // With offload the first SYN, from a stranger to 22, is rejected by the
    // kernel; the others are knocks, or from a source that just knocked.
    let by_kernel = match offload_on() {
        true => 1.0,
        false => 0.0,
    };
    if offload_on() {
        for (series, want) in [
            (r#"knockq_kernel_verdicts_total{verdict="reject"}"#, 1.0),
            (r#"knockq_kernel_verdicts_total{verdict="accept"}"#, 0.0),
            ("knockq_kernel_knocking_set_full_total", 0.0),
            (r#"knockq_kernel_set_updates_total{outcome="ok"}"#, 2.0),
        ] {
            assert_eq!(sample(&body, series), Some(want), "{series} in\n{body}");
        }
    }
    let expect = [
        (
            r#"knockq_verdicts_total{proto="tcp",reason="granted",verdict="accept"}"#,
            1.0,
        ),
        (
            r#"knockq_verdicts_total{proto="tcp",reason="knock",verdict="reject"}"#,
            2.0,
        ),
        (
            r#"knockq_verdicts_total{proto="tcp",reason="close",verdict="reject"}"#,
            1.0,
        ),
        (
            r#"knockq_verdicts_total{proto="tcp",reason="no_grant",verdict="reject"}"#,
            1.0 - by_kernel,
        ),
        (
            r#"knockq_verdicts_total{proto="other",reason="unparsable",verdict="reject"}"#,
            0.0,
        ),
        (
            r#"knockq_knocks_total{outcome="advanced",policy="ssh"}"#,
            1.0,
        ),
        (r#"knockq_knocks_total{outcome="reset",policy="ssh"}"#, 0.0),
        (r#"knockq_grants_total{policy="ssh"}"#, 1.0),
        (
            r#"knockq_grants_revoked_total{policy="ssh",reason="close_knock"}"#,
            1.0,
        ),
        (r#"knockq_active_grants{policy="ssh"}"#, 0.0),
        ("knockq_tracked_sources", 1.0),
        ("knockq_state_evictions_total", 0.0),
        ("knockq_verdict_duration_seconds_count", 5.0 - by_kernel),
        (
            r#"knockq_queue_dropped_total{queue="0",reason="queue_full"}"#,
            0.0,
        ),
        (
            r#"knockq_queue_dropped_total{queue="0",reason="user"}"#,
            0.0,
        ),
        (
            &format!(
                "knockq_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ];
    for (series, want) in expect {
        assert_eq!(sample(&body, series), Some(want), "{series} in\n{body}");
    }
    assert!(body.contains("\nprocess_resident_memory_bytes "), "{body}");
    assert!(!body.contains(src), "no source address in any label");

    let (landing_head, landing) = net.http_get(METRICS_PORT, "/");
    assert!(landing_head.starts_with("HTTP/1.0 200") && landing.contains("/metrics"));

    let scrape = net.dir.path().join("scrape.txt");
    std::fs::write(&scrape, &body).unwrap();
    let out = run(Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&scrape).unwrap()));
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}"
    );
}

/// A stock Prometheus server in the gate namespace, scraping every second.
struct Prometheus {
    child: Child,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    const PORT: u16 = 9090;

    fn start(net: &Net) -> Prometheus {
        let dir = net.dir.path();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: knockq\n    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.gate, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", Self::PORT))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Prometheus { child }
    }

    /// The value of an instant query's single sample, if there is one.
    fn query(net: &Net, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (_, body) = net.http_get(Self::PORT, &format!("/api/v1/query?query={encoded}"));
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    fn wait_for(net: &Net, query: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = Self::query(net, query);
            if value == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{query} is {value:?}, not {want}"
            );
            sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_sees_the_grant() {
    let test = "a_real_prometheus_sees_the_grant";
    if !can_run_end_to_end(test) || !can_run(test, true, &["prometheus"]) {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let _gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let _prometheus = Prometheus::start(&net);
    Prometheus::wait_for(&net, "up{job=\"knockq\"}", 1.0);
    Prometheus::wait_for(&net, "knockq_grants_total{policy=\"ssh\"}", 0.0);
    net.knock(CLIENTS4[0], &[1111, 2222]);
    Prometheus::wait_for(&net, "knockq_grants_total{policy=\"ssh\"}", 1.0);
    Prometheus::wait_for(&net, "knockq_active_grants{policy=\"ssh\"}", 1.0);
}

#[test]
fn operators_grant_and_revoke_through_the_control_socket() {
    if !can_run_end_to_end("operators_grant_and_revoke_through_the_control_socket") {
        return;
    }
    let mut net = Net::new();
    net.listen(&[22]);
    let gate = net.start_gate(EXAMPLE_CONFIG, IPV4_RULES);
    let [colleague, knocker, ..] = CLIENTS4;
    let mode = std::fs::metadata(net.control_socket()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let out = net.knockq_control("status");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no tracked sources\n");

    assert!(net.connect(colleague, 22).is_rejected());
    let out = net.knockq_control(&format!("grant {colleague} --policy ssh --for 1h"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("granted {colleague} under ssh for 1h\n")
    );
    assert_eq!(
        net.connect(colleague, 22),
        Reply::Open,
        "a grant by hand needs no knock"
    );
    gate.wait_for_log(&format!("event=grant src={colleague} policy=ssh"));

    net.knock(knocker, &[1111]);
    let out = net.knockq_control("status");
    let status = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = status.lines().collect();
    assert_eq!(lines.len(), 3, "{status}");
    assert!(
        lines[0].starts_with("SOURCE") && lines[0].contains("GRANT"),
        "{status}"
    );
    assert!(
        lines[1].starts_with(colleague) && lines[1].contains(" for "),
        "{status}"
    );
    assert!(
        lines[2].starts_with(knocker) && lines[2].contains("1/2, next within"),
        "{status}"
    );
    let out = net.knockq_control("status --json");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["result"], "status");
    assert_eq!(json["sources"][0]["source"], colleague);
    assert_eq!(json["sources"][1]["progress"]["stage"], 1);

    // Malformed requests get a clear error and change nothing.
    let socket = net.control_socket();
    let out = net.in_gate(&format!(
        "printf 'garbage\\n' | nc -N -U {}",
        socket.display()
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"result\":\"error\",\"error\":\"malformed request: expected value at line 1 column 1\"}\n"
    );
    let out = net.knockq_control(&format!("grant {knocker} --policy nope"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "knockq: unknown policy \"nope\" (policies: ssh)\n"
    );
    let out = net.knockq_control("revoke 10.9.0.99");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "knockq: 10.9.0.99 holds no grant\n"
    );
    assert_eq!(
        net.knockq_control("status").stdout,
        lines
            .join("\n")
            .into_bytes()
            .into_iter()
            .chain(*b"\n")
            .collect::<Vec<u8>>()
    );

    let out = net.knockq_control(&format!("revoke {colleague}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("revoked 1 grant of {colleague}\n")
    );
    assert!(net.connect(colleague, 22).is_rejected(), "revoked");
    gate.wait_for_log(&format!(
        "event=revoke src={colleague} policy=ssh reason=admin"
    ));
    let (_, metrics) = net.http_get(METRICS_PORT, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            r#"knockq_grants_revoked_total{policy="ssh",reason="admin"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn json_logs_carry_the_event_fields() {
    if !can_run_end_to_end("json_logs_carry_the_event_fields") {
        return;
    }
    let net = Net::new();
    let config = net.config(EXAMPLE_CONFIG);
    net.load_rules(&config, "iptables");
    let gate = net.start_daemon_with(&config, &["--log-format", "json"]);
    net.knock(CLIENTS4[0], &[1111, 2222]);
    gate.wait_for_log("\"event\":\"grant\"");
    let grant = gate
        .log()
        .lines()
        .find(|l| l.contains("\"event\":\"grant\""))
        .unwrap()
        .to_owned();
    let grant: serde_json::Value = serde_json::from_str(&grant).unwrap();
    assert_eq!(grant["level"], "INFO");
    assert_eq!(grant["src"], CLIENTS4[0]);
    assert_eq!(grant["policy"], "ssh");
    assert_eq!(grant["ports"], "22,8080");
}

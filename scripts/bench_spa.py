#!/usr/bin/env python3
"""knockq's single packet authorization against Debian's fwknopd, on the
same namespaces (`make bench-spa`, as root; see BENCHMARKS.md).

1. The time from the SPA packet to the first accepted SYN. Each round a
   fresh packet from fwknop's own client (`-T -B`, not sent by it), for a
   client address of its own; a probe sends it and at once tries connect()
   to port 22 every millisecond until one is accepted. knockq decides the
   packet before its verdict; fwknopd sniffs it, then runs iptables.
2. The daemon's CPU per datagram under a flood from trafgen at
   KNOCKQ_BENCH_RATE datagrams a second (100,000) for KNOCKQ_BENCH_SECONDS
   (10): plain UDP knocks to a sequence's first port, as the baseline, and
   forged SPA packets (a real packet with its last character changed, so
   every copy costs a whole HMAC) with 1 user, 1,000 users on the shared
   port of whom the default 16 are tried, 1,000 users all tried, and 1,000
   users on ports of their own, flooded on one of them.

`cargo bench --bench spa` gives the engine's own cost of each, on one core.
"""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CLIENT, FLOODER, GATE, KNOCKQ, TICKS, Net, sh  # noqa: E402

ROUNDS = int(os.environ.get("KNOCKQ_BENCH_ROUNDS", "10"))
RATE = os.environ.get("KNOCKQ_BENCH_RATE", "100000")
SECONDS = int(os.environ.get("KNOCKQ_BENCH_SECONDS", "10"))
# Users with ports of their own get OWN_PORTS + n; the flood goes to one.
OWN_PORTS = 40000

PROBE = r"""
import socket, sys, time
src, dst, path = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(path, "rb").read().strip()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((src, 0))
started = time.perf_counter()
udp.sendto(data, (dst, 62201))
refused = 0
while True:
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(1)
    try:
        s.connect((dst, 22))
        break
    except OSError:
        refused += 1
        time.sleep(0.001)
    finally:
        s.close()
print(time.perf_counter() - started, refused)
"""


def keys(workdir):
    out = sh(f"HOME={workdir} fwknop --key-gen").stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    key, hmac = fields["KEY_BASE64"].strip(), fields["HMAC_KEY_BASE64"].strip()
    for name, value in (("alice.key", key), ("alice.hmac", hmac)):
        path = workdir / name
        path.write_text(value + "\n")
        path.chmod(0o600)
    return key, hmac


def make_packet(net, workdir, key, hmac, src, name):
    path = workdir / name
    net.run(net.client, f"env HOME={workdir} fwknop -A tcp/22 -a {src} -D {GATE} -U alice --use-hmac "
            f"--key-base64-rijndael {key} --key-base64-hmac {hmac} --no-save-args -T -B {path}")
    return path


def spa_config(workdir, users, tried, own_ports=False):
    text = ("[[policy]]\nname = \"udp\"\nsequence = [\"7000/udp\", \"8000/udp\"]\nopen_ports = [2222]\n\n"
            f"[[policy]]\nname = \"spa\"\nopen_ports = [22]\ngrant_timeout = \"60s\"\n[policy.spa]\n"
            f"max_candidates = {tried}\n"
            "[[policy.spa.user]]\nname = \"alice\"\nkey_file = \"alice.key\"\nhmac_key_file = \"alice.hmac\"\n")
    for n in range(1, users):
        text += (f"[[policy.spa.user]]\nname = \"u{n}\"\nkey_file = \"u{n}.key\"\n"
                 f"hmac_key_file = \"u{n}.hmac\"\n")
        if own_ports:
            text += f"port = {OWN_PORTS + n}\n"
        for ext in ("key", "hmac"):
            path = workdir / f"u{n}.{ext}"
            if not path.exists():
                path.write_text(sh("head -c 32 /dev/urandom | base64").stdout)
                path.chmod(0o600)
    config = workdir / f"knockq-{users}-{tried}-{own_ports}.toml"
    config.write_text(text)
    return config


def start_knockq(net, workdir, config):
    rules = sh(f"{KNOCKQ} rules --config {config} --backend iptables").stdout
    (workdir / "rules.iptables").write_text(rules)
    net.run(net.gate, f"iptables-restore {workdir / 'rules.iptables'}")
    process = net.spawn(net.gate, [KNOCKQ, "run", "--config", config, "--control-socket",
                                   workdir / "control.sock", "--state-dir", workdir / "state"],
                        stderr=subprocess.DEVNULL, env={**os.environ, "KNOCKQ_LOG": "warn"})
    deadline = time.time() + 10
    while not net.run(net.gate, "cat /proc/net/netfilter/nfnetlink_queue").stdout.strip():
        if time.time() > deadline:
            raise RuntimeError("knockq did not bind the queue")
        time.sleep(0.05)
    return process


def start_fwknopd(net, workdir, key, hmac):
    (workdir / "access.conf").write_text(
        f"SOURCE ANY\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac}\nFW_ACCESS_TIMEOUT 60\n")
    (workdir / "fwknopd.conf").write_text("")
    (workdir / "run").mkdir(exist_ok=True)
    net.run(net.gate, "iptables -A INPUT -p tcp --dport 22 -j REJECT")
    log = open(workdir / "fwknopd.log", "w")
    process = net.spawn(net.gate, ["fwknopd", "-f", "-i", "veth0", "-c", workdir / "fwknopd.conf",
                                   "-a", workdir / "access.conf", "-r", workdir / "run"],
                        stdout=log, stderr=subprocess.STDOUT)
    # It sniffs from its main loop on: a packet sent before is not seen.
    deadline = time.time() + 10
    while "main event loop" not in (workdir / "fwknopd.log").read_text():
        if time.time() > deadline:
            raise RuntimeError("fwknopd did not start sniffing")
        time.sleep(0.05)
    return process


def first_accept(gate):
    """Seconds from the packet to the first accepted connect, per round,
    and the connects refused before it."""
    net = Net(f"kqspa-{gate}")
    workdir = Path(tempfile.mkdtemp(prefix="knockq-bench-spa-"))
    try:
        net.run(net.gate, "sysctl -qw net.ipv4.icmp_ratelimit=0")
        key, hmac = keys(workdir)
        if gate == "knockq":
            process = start_knockq(net, workdir, spa_config(workdir, 1, 16))
        else:
            process = start_fwknopd(net, workdir, key, hmac)
        probe = workdir / "probe.py"
        probe.write_text(PROBE)
        results = []
        for round_number in range(ROUNDS):
            src = f"10.9.0.{100 + round_number}"
            net.run(net.client, f"ip addr add {src}/24 dev veth1")
            packet = make_packet(net, workdir, key, hmac, src, f"round{round_number}.spa")
            took, refused = net.run(net.client, f"python3 {probe} {src} {GATE} {packet}").stdout.split()
            results.append((float(took), int(refused)))
        process.kill()
        process.wait()
        return results
    finally:
        net.close()


def metric(net, name):
    body = net.run(net.gate, "python3 -c \"import urllib.request; "
                   "print(urllib.request.urlopen('http://127.0.0.1:9724/metrics').read().decode())\"").stdout
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


def flood_cost(kind, users, tried, own_ports=False):
    """The daemon's CPU µs per decided datagram under the flood."""
    net = Net(f"kqspaf-{users}")
    workdir = Path(tempfile.mkdtemp(prefix="knockq-bench-spa-"))
    try:
        key, hmac = keys(workdir)
        process = start_knockq(net, workdir, spa_config(workdir, users, tried, own_ports))
        if kind == "knock":
            payload, port, counted = '"x"', 7000, 'knockq_verdicts_total{proto="udp",reason="knock"'
        else:
            packet = make_packet(net, workdir, key, hmac, CLIENT, "made.spa").read_text().strip()
            forged = packet[:-1] + ("B" if packet.endswith("A") else "A")
            port = OWN_PORTS + users // 2 if own_ports else 62201
            payload, counted = f'"{forged}"', 'knockq_spa_packets_total{outcome="bad_hmac"'
        config = workdir / "flood.cfg"
        config.write_text("{\n  eth(da=%s, sa=%s),\n  ipv4(saddr=drnd(), daddr=%s, ttl=64),\n"
                          "  udp(sp=drnd(), dp=%d), %s,\n}\n"
                          % (net.mac(net.gate, "veth0"), net.mac(net.client, "veth1"), GATE, port, payload))
        fields = lambda: Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = lambda: (int(fields()[11]) + int(fields()[12])) / TICKS
        before, decided_before = cpu(), metric(net, counted)
        flood = net.spawn(net.client, ["trafgen", "--cpus", "1", "-q", "-o", "veth1", "-b", f"{RATE}pps",
                                       "-i", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
        time.sleep(SECONDS)
        os.killpg(flood.pid, 9)
        flood.wait()
        time.sleep(0.5)
        used, decided = cpu() - before, metric(net, counted) - decided_before
        process.kill()
        process.wait()
        return used / max(decided, 1) * 1e6, decided / SECONDS
    finally:
        net.close()


def main():
    if os.geteuid() != 0:
        sys.exit("bench_spa: run as root")
    print(f"SPA packet to the first accepted SYN, {ROUNDS} rounds each")
    for gate in ("knockq", "fwknopd"):
        results = sorted(first_accept(gate))
        times = [took * 1000 for took, _ in results]
        refused = sorted(r for _, r in results)
        print(f"| {gate} | {times[len(times) // 2]:.2f} ms | {times[0]:.2f}–{times[-1]:.2f} ms "
              f"| {refused[len(refused) // 2]} (max {refused[-1]}) |")
    print(f"\nDaemon CPU per datagram, flood of {RATE}/s for {SECONDS} s")
    baseline = None
    cases = (("knock", 1, 16, False), ("forged", 1, 16, False), ("forged", 1000, 16, False),
             ("forged", 1000, 1000, False), ("forged", 1000, 16, True))
    for kind, users, tried, own_ports in cases:
        cost, rate = flood_cost(kind, users, tried, own_ports)
        baseline = baseline or cost
        label = ("plain UDP knocks" if kind == "knock" else
                 f"forged SPA, {users} users on ports of their own" if own_ports else
                 f"forged SPA, {users} users, {tried} tried")
        print(f"| {label} | {rate:,.0f}/s | {cost:.2f} µs | {cost / baseline:.2f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""knockq's end-to-end benchmark (`make bench`, as root).

Three gates, side by side in one run, each in a fresh pair of network
namespaces joined by a veth pair, against the same SYN flood from trafgen
(random source addresses, to knock port 1111) on one core:

  knockq   the daemon with the example configuration;
  floor    a minimal nfq consumer that answers every packet with the reject
           mark and NF_REPEAT: the floor of any userspace gate;
  kernel   the in-kernel xt_recent recipe, no userspace hop: the limit;
  knockq-2q  knockq with [queue] count = 2 and --queue-balance 0:1;
  knockq-script  knockq with the same knock as a script policy
             (examples/policies/seed.toml): every flooded SYN enters the script;
  knockq-offload  knockq with [rules] offload = true: the kernel rejects
             sources neither knocking nor granted and accepts granted
             (source, port) pairs from sets knockq keeps; its granted client
             is granted through the control socket, so it is not knocking;
  baseline   with KNOCKQ_BENCH_BASELINE=PATH, another knockq build (an
             earlier commit, say) with the same configuration as knockq.

Four floods, each with its own table: random sources to the first knock port
(1111), and random sources to an open port (22), which is what scans and SYN
floods send; and the same as UDP datagrams, to a UDP knock port (1111/udp)
and a UDP open port (51820/udp), with a UDP policy beside the example's
(and the recipe's chains again with -p udp). KNOCKQ_BENCH_FLOODS=knock,open,
udp-knock,udp-open picks among them.

For each gate it measures the SYNs decided per second and the kernel's queue
drops during the flood (and how many of them because the gate's socket
buffer was full rather than its queue), the gate process's CPU time per
decided SYN and how much of it was spent in the kernel (from
/proc/PID/stat), and the time from connect() to its answer for a granted
source, at light load and during the flood. Rounds alternate the gates; the
table reports medians over rounds, and ratios within this one run.
KNOCKQ_BENCH_RATE=N limits the flood to N SYNs per second;
KNOCKQ_BENCH_GATES=knockq,knockq-script,... measures only those gates.
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KNOCKQ = ROOT / "target/release/knockq"
FLOOR = ROOT / "target/release/examples/nfq_floor"
BASELINE = os.environ.get("KNOCKQ_BENCH_BASELINE")
# SYNs per second of the flood; unset: as fast as trafgen goes on one core.
RATE = os.environ.get("KNOCKQ_BENCH_RATE")
RECIPE = ROOT / "tests/testdata/recent-recipe.iptables"
UDP_RECIPE = ROOT / "tests/testdata/recent-recipe-udp.iptables"
CONFIG = ROOT / "examples/knockq.toml"
# Beside the example's policy under UDP floods: the same knock, by datagram.
UDP_POLICY = """
[[policy]]
name = "wireguard"
sequence = ["1111/udp", "2222/udp"]
open_ports = ["51820/udp"]
close_port = "3333/udp"
"""
SCRIPT_CONFIG = ROOT / "examples/policies/seed.toml"
GATE, CLIENT, FLOODER = "10.9.0.1", "10.9.0.2", "10.9.0.3"
ROUNDS = int(os.environ.get("KNOCKQ_BENCH_ROUNDS", "3"))
FLOOD_SECONDS = int(os.environ.get("KNOCKQ_BENCH_SECONDS", "10"))
# Connects per latency measurement: enough for a p99 that is not one or two
# unlucky samples.
PROBES = 1000
TICKS = os.sysconf("SC_CLK_TCK")

# The time from the last knock to its answer, which waits for the kernel
# set update with offload: knock 1111, time 2222, close with 3333.
GRANT_PROBE = r"""
import socket, sys, time
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
def knock(port):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(3)
    start = time.perf_counter()
    try:
        s.connect((dst, port))
    except OSError:
        pass
    s.close()
    return time.perf_counter() - start
for _ in range(count):
    knock(1111)
    print(f"{knock(2222):.9f}", flush=True)
    knock(3333)
"""

LATENCY_PROBE = r"""
import socket, sys, time
src, dst, count, pause, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
deadline = time.perf_counter() + seconds
for _ in range(count):
    if time.perf_counter() > deadline:
        break
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(3)
    start = time.perf_counter()
    try:
        s.connect((dst, 22))
        outcome = "open"
    except OSError as e:
        outcome = type(e).__name__
    took = time.perf_counter() - start
    s.close()
    print(f"{took:.9f} {outcome}", flush=True)
    time.sleep(pause)
"""

LISTENER = r"""
import socket
server = socket.create_server(("10.9.0.1", 22), backlog=4096)
while True:
    connection, _ = server.accept()
    connection.close()
"""


def sh(command, check=True, **kwargs):
    return subprocess.run(command, shell=True, check=check, text=True, capture_output=True, **kwargs)


class Net:
    """Two namespaces joined by veth; the flood's replies go back through the
    client side, which drops them."""

    def __init__(self, name):
        self.gate, self.client = f"{name}-gate", f"{name}-client"
        for ns in (self.gate, self.client):
            sh(f"ip netns add {ns} && ip -n {ns} link set lo up")
        sh(f"ip -n {self.gate} link add veth0 type veth peer name veth1 netns {self.client}")
        sh(f"ip -n {self.gate} addr add {GATE}/24 dev veth0 && ip -n {self.gate} link set veth0 up")
        sh(f"ip -n {self.client} addr add {CLIENT}/24 dev veth1 && ip -n {self.client} addr add {FLOODER}/24 dev veth1")
        sh(f"ip -n {self.client} link set veth1 up && ip -n {self.gate} route add default via {CLIENT}")
        self.children = [self.spawn(self.gate, ["python3", "-c", LISTENER])]
        # The kernel gate starts probing at once: the service must be up.
        deadline = time.time() + 10
        while f"{GATE}:22 " not in self.run(self.gate, "ss -ltnH").stdout:
            if time.time() > deadline:
                raise RuntimeError("the listener did not start")
            time.sleep(0.05)

    def spawn(self, ns, argv, **kwargs):
        return subprocess.Popen(["ip", "netns", "exec", ns, *map(str, argv)], **kwargs)

    def run(self, ns, command, check=True):
        return sh(f"ip netns exec {ns} {command}", check=check)

    def mac(self, ns, dev):
        return sh(f"ip -n {ns} -br link show {dev}").stdout.split()[2]

    def queue_drops(self):
        """Packets the kernel dropped for the gate's queues: (queue full,
        socket receive buffer full)."""
        rows = self.run(self.gate, "cat /proc/net/netfilter/nfnetlink_queue").stdout.splitlines()
        rows = [row.split() for row in rows if row.strip()]
        return sum(int(row[5]) for row in rows), sum(int(row[6]) for row in rows)

    def close(self):
        for child in self.children:
            child.kill()
            child.wait()
        for ns in (self.gate, self.client):
            sh(f"ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}", check=False)


def knock(net, src):
    for port in (1111, 2222):
        net.run(net.client, f"nc -z -w 1 -s {src} {GATE} {port}", check=False)


class Gate:
    def __init__(self, kind, net, workdir, udp):
        self.kind, self.net, self.process, self.udp = kind, net, None, udp
        if kind == "kernel":
            net.run(net.gate, f"iptables-restore {UDP_RECIPE if udp else RECIPE}")
            return
        config = workdir / "knockq.toml"
        queues = 2 if kind == "knockq-2q" else 1
        source = CONFIG
        if kind == "knockq-script":
            source = SCRIPT_CONFIG
            (workdir / "seed.lua").write_text((SCRIPT_CONFIG.parent / "seed.lua").read_text())
        text = source.read_text().replace("count = 1", f"count = {queues}")
        if udp:
            text += UDP_POLICY
        if kind == "knockq-offload":
            text = "[rules]\noffload = true\n\n" + text
        config.write_text(text)
        self.control = workdir / "control.sock"
        if kind == "knockq-offload":
            # The sets come with the rules: --apply loads both.
            net.run(net.gate, f"{KNOCKQ} rules --apply --config {config} --backend iptables")
            if "KNOCKQ-SYN" not in net.run(net.gate, "iptables -S").stdout:
                raise RuntimeError("knockq-offload: the offload rules are not loaded")
        else:
            rules = sh(f"{KNOCKQ} rules --config {config} --backend iptables").stdout
            path = workdir / "rules.iptables"
            path.write_text(rules)
            net.run(net.gate, f"iptables-restore {path}")
        if kind.startswith("knockq") or kind == "baseline":
            binary = BASELINE if kind == "baseline" else KNOCKQ
            argv = [binary, "run", "--config", config, "--control-socket", self.control,
                    "--state-dir", workdir / "state"]
            self.process = net.spawn(net.gate, argv, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "KNOCKQ_LOG": "warn"})
        else:
            self.process = net.spawn(net.gate, [FLOOR], stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not net.run(net.gate, "cat /proc/net/netfilter/nfnetlink_queue").stdout.strip():
            if time.time() > deadline:
                raise RuntimeError(f"{kind} did not bind the queue")
            time.sleep(0.05)

    def cpu_seconds(self):
        """The gate process's CPU time so far: (user, kernel) seconds."""
        if self.process is None:
            return None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICKS, int(fields[12]) / TICKS

    def grant(self, src):
        """The granted client: knocked in, or with offload granted by hand,
        so that it is not in the knocking set and the kernel decides it."""
        if self.kind == "knockq-offload":
            self.net.run(self.net.gate, f"{KNOCKQ} grant {src} --policy ssh --control-socket {self.control}")
        elif self.kind != "floor":
            knock(self.net, src)

    def decided(self):
        """SYNs the gate has answered: the reject rules' counters (every flood
        SYN is rejected: after the queue, and with offload in the kernel)
        for the queue gates; the recipe's dispatch rule for the kernel."""
        table = self.net.run(self.net.gate, "iptables -nvxL").stdout
        decided = None
        dispatch = "UDP_DISPATCH" if self.udp else "KNOCK_DISPATCH"
        for line in table.splitlines():
            if self.kind == "kernel" and dispatch in line and line.split()[2] == dispatch:
                return int(line.split()[0])
            if self.kind != "kernel" and "REJECT" in line and ("mark match" in line or "knockq-kernel-reject" in line):
                decided = (decided or 0) + int(line.split()[0])
        if decided is None:
            raise RuntimeError(f"no counter in\n{table}")
        return decided

    def close(self):
        if self.process:
            self.process.kill()
            self.process.wait()


def latencies(net, count, pause, seconds=60):
    """connect() to answer times from the granted client, within `seconds`;
    a connect that gets no answer in 3 s counts as 3 s."""
    out = net.run(net.client, f"python3 -c '{LATENCY_PROBE}' {CLIENT} {GATE} {count} {pause} {seconds}").stdout
    rows = [line.split() for line in out.splitlines()]
    return [float(took) for took, _ in rows], [outcome for _, outcome in rows]


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def measure(kind, flood_port, proto, round_number):
    workdir = Path(tempfile.mkdtemp(prefix="knockq-bench-"))
    net = Net(f"kqb{round_number}{kind[:2]}{kind[-2:]}")
    gate = None
    try:
        gate = Gate(kind, net, workdir, proto == "udp")
        grant_knock = None
        if kind in ("knockq", "knockq-offload") and flood_port == 1111 and proto == "tcp":
            # Every knock is answered with an ICMP error: lift the kernel's
            # rate limit on them for the probe, so none waits for a timeout.
            limits = "net.ipv4.icmp_ratelimit net.ipv4.icmp_msgs_per_sec"
            saved = net.run(net.gate, f"sysctl -n {limits}").stdout.split()
            net.run(net.gate, "sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv4.icmp_msgs_per_sec=1000000")
            out = net.run(net.client, f"python3 -c '{GRANT_PROBE}' {FLOODER} {GATE} 100").stdout
            net.run(net.gate, f"sysctl -qw net.ipv4.icmp_ratelimit={saved[0]} net.ipv4.icmp_msgs_per_sec={saved[1]}")
            grant_knock = [float(line) for line in out.split()]
        # The floor rejects everything: its latency is the time to the reject.
        gate.grant(CLIENT)
        light, outcomes = latencies(net, PROBES, 0.002)
        if kind != "floor" and outcomes.count("open") != len(outcomes):
            raise RuntimeError(f"{kind}: granted source refused: {set(outcomes)}")
        config = workdir / "flood.cfg"
        transport = {
            "tcp": "tcp(sp=drnd(), dp=%d, seq=drnd(), syn, window=64240)" % flood_port,
            "udp": "udp(sp=drnd(), dp=%d),\n  fill(0x00, 8)" % flood_port,
        }[proto]
        config.write_text(
            "{\n  eth(da=%s, sa=%s),\n  ipv4(saddr=drnd(), daddr=%s, ttl=64),\n  %s,\n}\n"
            % (net.mac(net.gate, "veth0"), net.mac(net.client, "veth1"), GATE, transport))
        decided_before, drops_before, cpu_before = gate.decided(), net.queue_drops(), gate.cpu_seconds()
        rate = ["--rate", f"{RATE}pps"] if RATE else []
        flood = net.spawn(net.client, ["trafgen", "--cpus", "1", "-q", "-o", "veth1", "-i", config, *rate],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        started = time.time()
        time.sleep(1)
        loaded, answers = latencies(net, PROBES, 0.01, FLOOD_SECONDS - 2)
        time.sleep(max(0.0, FLOOD_SECONDS - (time.time() - started)))
        elapsed = time.time() - started
        decided, drops, cpu = gate.decided(), net.queue_drops(), gate.cpu_seconds()
        os.killpg(flood.pid, 9)
        flood.wait()
        decided -= decided_before
        full_queue, full_buffer = (after - before for after, before in zip(drops, drops_before))
        cpu = None if cpu is None else [(after - before) / max(1, decided) * 1e6
                                        for after, before in zip(cpu, cpu_before)]
        # The floor rejects every SYN, and the kernel rate-limits the ICMP
        # answers per destination: its times say nothing about a gate.
        rejects_all = kind == "floor"
        return {
            "decided_pps": decided / elapsed,
            "drop_share": (full_queue + full_buffer) / max(1, decided + full_queue + full_buffer),
            "buffer_drop_share": full_buffer / max(1, decided + full_queue + full_buffer),
            "cpu_us_per_packet": None if cpu is None else sum(cpu),
            "kernel_us_per_packet": None if cpu is None else cpu[1],
            "light_p50_us": None if rejects_all else percentile(light, 50) * 1e6,
            "light_p99_us": None if rejects_all else percentile(light, 99) * 1e6,
            "flood_p50_us": None if rejects_all else percentile(loaded, 50) * 1e6,
            "flood_p99_us": None if rejects_all else percentile(loaded, 99) * 1e6,
            "flood_unanswered": None if rejects_all else answers.count("TimeoutError") / len(answers),
            "grant_knock_p50_us": None if grant_knock is None else percentile(grant_knock, 50) * 1e6,
            "grant_knock_p99_us": None if grant_knock is None else percentile(grant_knock, 99) * 1e6,
        }
    finally:
        if gate:
            gate.close()
        net.close()


def median(results, key):
    values = [r[key] for r in results if r[key] is not None]
    return statistics.median(values) if values else None


def cell(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


# The gates measured under each flood: under the flood to an open port the
# others behave as knockq does.
FLOODS = {
    "knock": (1111, "tcp", ["knockq", "floor", "kernel", "knockq-2q", "knockq-script", "knockq-offload"]),
    "open": (22, "tcp", ["knockq", "kernel", "knockq-offload"]),
    "udp-knock": (1111, "udp", ["knockq", "kernel", "knockq-offload"]),
    "udp-open": (51820, "udp", ["knockq", "kernel", "knockq-offload"]),
}


def ratio(a, b, key):
    if a is None or b is None or a.get(key) is None or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.2f}"


def main():
    if os.geteuid() != 0:
        sys.exit("make bench needs root: it creates network namespaces")
    for binary in (KNOCKQ, FLOOR):
        if not binary.exists():
            sys.exit(f"{binary} is missing: run `make bench`, which builds it")
    floods = os.environ.get("KNOCKQ_BENCH_FLOODS", "knock,open,udp-knock,udp-open").split(",")
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(" :\t")
    print(f"Machine: {os.cpu_count()} CPUs, {cpu}; kernel {os.uname().release}")
    tables = {}
    for flood in floods:
        port, proto, gates = FLOODS[flood]
        # An earlier build may not read UDP ports.
        gates = gates + (["baseline"] if BASELINE and proto == "tcp" else [])
        if os.environ.get("KNOCKQ_BENCH_GATES"):
            gates = [g for g in os.environ["KNOCKQ_BENCH_GATES"].split(",") if g in gates]
        tables[flood] = report(flood, port, proto, gates)
    # The same path by datagram and by SYN: a knock port, an open port.
    for udp, tcp in (("udp-knock", "knock"), ("udp-open", "open")):
        for gate in ("knockq", "knockq-offload"):
            u, t = tables.get(udp, {}).get(gate), tables.get(tcp, {}).get(gate)
            if u and t:
                print(f"{gate}, {udp} / {tcp} flood: CPU per datagram / per SYN {ratio(u, t, 'cpu_us_per_packet')}, "
                      f"decided per second {ratio(u, t, 'decided_pps')}")


def report(flood, port, proto, gates):
    results = {gate: [] for gate in gates}
    for round_number in range(ROUNDS):
        order = gates[round_number % len(gates):] + gates[:round_number % len(gates)]
        for gate in order:
            print(f"{flood} flood, round {round_number + 1}/{ROUNDS}: {gate}", file=sys.stderr, flush=True)
            results[gate].append(measure(gate, port, proto, round_number))
    keys = ["decided_pps", "drop_share", "buffer_drop_share", "cpu_us_per_packet", "kernel_us_per_packet",
            "light_p50_us", "light_p99_us",
            "flood_p50_us", "flood_p99_us", "flood_unanswered", "grant_knock_p50_us", "grant_knock_p99_us"]
    table = {gate: {key: median(results[gate], key) for key in keys} for gate in gates}
    speed = f"at {RATE} SYNs/s" if RATE else "as fast as it goes"
    print(f"\nFlood: trafgen on one core, {speed}, random sources to port {port}/{proto}, {FLOOD_SECONDS} s; "
          f"{PROBES} connects per latency measurement; medians of {ROUNDS} rounds.\n")
    print("| gate | new flows decided/s | kernel queue drops (of which socket buffer) | CPU µs per new flow "
          "(of which kernel) | answer p50 light (µs) "
          "| p99 light (µs) | p50 under flood (µs) | p99 under flood (µs) | unanswered in 3 s under flood |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for gate in gates:
        t = table[gate]
        buffer = None if t['buffer_drop_share'] is None else t['buffer_drop_share'] * 100
        print(f"| {gate} | {cell(t['decided_pps'], 0)} | {cell(t['drop_share'] * 100, 2)} % ({cell(buffer, 2)} %) "
              f"| {cell(t['cpu_us_per_packet'], 2)} ({cell(t['kernel_us_per_packet'], 2)}) "
              f"| {cell(t['light_p50_us'])} | {cell(t['light_p99_us'])} "
              f"| {cell(t['flood_p50_us'])} | {cell(t['flood_p99_us'])} | {cell(None if t['flood_unanswered'] is None else t['flood_unanswered'] * 100)} % |")
    k, f, n = table.get("knockq"), table.get("floor"), table.get("kernel")
    o = table.get("knockq-offload")
    print()
    if k and f:
        print(f"knockq / floor: CPU per SYN {ratio(k, f, 'cpu_us_per_packet')}, "
              f"SYNs decided per second {ratio(k, f, 'decided_pps')}")
    if k and "knockq-2q" in table:
        two = table["knockq-2q"]
        print(f"knockq with two queues / one queue: SYNs decided per second "
              f"{ratio(two, k, 'decided_pps')}, CPU per SYN {ratio(two, k, 'cpu_us_per_packet')}")
    if k and n:
        print(f"knockq / kernel: answer p99 at light load {ratio(k, n, 'light_p99_us')}, "
              f"p99 under flood {ratio(k, n, 'flood_p99_us')}, "
              f"SYNs decided per second {ratio(k, n, 'decided_pps')}")
    if o and n:
        print(f"knockq-offload / kernel: SYNs decided per second {ratio(o, n, 'decided_pps')}, "
              f"granted p99 under flood {ratio(o, n, 'flood_p99_us')}, at light load {ratio(o, n, 'light_p99_us')}")
    if o and k:
        print(f"knockq-offload / knockq: daemon CPU per SYN {ratio(o, k, 'cpu_us_per_packet')}, "
              f"SYNs decided per second {ratio(o, k, 'decided_pps')}")
        if k.get("grant_knock_p50_us") is not None:
            print(f"answer to the granting knock, p50 (p99): knockq {cell(k['grant_knock_p50_us'])} "
                  f"({cell(k['grant_knock_p99_us'])}) µs, knockq-offload {cell(o['grant_knock_p50_us'])} "
                  f"({cell(o['grant_knock_p99_us'])}) µs: the kernel set update costs "
                  f"{cell(o['grant_knock_p50_us'] - k['grant_knock_p50_us'])} µs at the median")
    if k and "knockq-script" in table:
        sc = table["knockq-script"]
        print(f"script policy / built-in policy: CPU per SYN "
              f"{ratio(sc, k, 'cpu_us_per_packet')}, SYNs decided per second {ratio(sc, k, 'decided_pps')}")
    if k and "baseline" in table:
        b = table["baseline"]
        print(f"knockq / baseline ({BASELINE}): CPU per SYN "
              f"{ratio(k, b, 'cpu_us_per_packet')}, SYNs decided per second {ratio(k, b, 'decided_pps')}")
    return table


if __name__ == "__main__":
    main()

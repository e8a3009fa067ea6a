# knockq: `make demo` shows the gate working, `make test` runs every test.
.PHONY: demo test rules bench bench-spa deb fuzz

demo:
	scripts/demo

test:
	scripts/test

# Every fuzz target for FUZZ_SECONDS each (default 60): cargo fuzz, libFuzzer,
# the nightly toolchain. The corpus is replayed on stable by make test.
fuzz:
	scripts/fuzz $(or $(FUZZ_SECONDS),60)

# Regenerates rules/ from the example configuration.
rules:
	cargo run --quiet -- rules --config examples/knockq.toml --backend iptables > rules/knockq.iptables
	cargo run --quiet -- rules --config examples/knockq.toml --backend ip6tables > rules/knockq.ip6tables
	cargo run --quiet -- rules --config examples/knockq.toml --backend nft > rules/knockq.nft

# knockq, the minimal NFQUEUE consumer and the in-kernel recipe under one
# SYN flood, side by side (root; see BENCHMARKS.md). The engine alone:
# cargo bench --bench engine.
bench:
	scripts/install-deps
	cargo build --release --locked --bin knockq --example nfq_floor
	python3 scripts/bench.py

# knockq's single packet authorization against Debian's fwknopd (root; see
# BENCHMARKS.md), and the engine's SPA costs on one core.
bench-spa:
	scripts/install-deps
	cargo build --release --locked --bin knockq
	python3 scripts/bench_spa.py
	cargo bench --locked --bench spa

# The Debian package: target/debian/knockq_<version>_amd64.deb, with the man
# pages and completions generated from the command line's definition.
deb:
	cargo build --release --locked --bin knockq
	rm -rf target/assets
	target/release/knockq generate man target/assets/man > /dev/null
	target/release/knockq generate completions target/assets/completions > /dev/null
	cargo deb --no-build --locked --strip

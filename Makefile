# knockq: `make demo` shows the gate working, `make test` runs every test.
.PHONY: demo test rules

demo:
	scripts/demo

test:
	scripts/test

# Regenerates rules/ from the example configuration.
rules:
	cargo run --quiet -- rules --config examples/knockq.toml --backend iptables > rules/knockq.iptables
	cargo run --quiet -- rules --config examples/knockq.toml --backend ip6tables > rules/knockq.ip6tables
	cargo run --quiet -- rules --config examples/knockq.toml --backend nft > rules/knockq.nft

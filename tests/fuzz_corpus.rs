//! Every input of the fuzz corpus (`fuzz/corpus/TARGET`: the seeds, and
//! each crash the fuzzer found, kept as a regression), replayed through its
//! target on stable: a machine without the nightly toolchain still checks
//! them all.

use std::fs;
use std::path::Path;

#[test]
fn every_corpus_input_goes_through_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in knockq::fuzzing::TARGETS {
        let source = fuzz.join("fuzz_targets").join(format!("{name}.rs"));
        let text = fs::read_to_string(&source).unwrap_or_else(|e| panic!("{source:?}: {e}"));
        assert!(
            text.contains(&format!("knockq::fuzzing::{name}(data)")),
            "{source:?} does not enter knockq::fuzzing::{name}"
        );
        let dir = fuzz.join("corpus").join(name);
        let mut inputs: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "no seed for {name} in {dir:?}");
        for input in inputs {
            target(&fs::read(&input).unwrap());
        }
    }
    let targets = fs::read_dir(fuzz.join("fuzz_targets")).unwrap().count();
    assert_eq!(
        targets,
        knockq::fuzzing::TARGETS.len(),
        "a target knockq::fuzzing does not list"
    );
}

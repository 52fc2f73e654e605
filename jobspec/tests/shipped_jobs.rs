//! Every job spec shipped in `configs/jobs/` parses, and the training ones pass `check_runnable` (the layout checks
//! `qctl submit` applies), so the examples the docs point to stay valid as the spec evolves.

use qjobspec::JobSpec;

#[test]
fn every_shipped_job_spec_parses_and_is_runnable() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/jobs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = JobSpec::parse(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        spec.check_runnable(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        if spec.kind.is_training() {
            assert!(spec.training().is_some(), "{name}: training settings do not resolve");
        }
        seen += 1;
    }
    assert!(seen >= 5, "expected the shipped job specs in {}, found {seen}", dir.display());
}

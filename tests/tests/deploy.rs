//! The systemd units in deploy/systemd pass `systemd-analyze verify` (with stand-in binaries at the
//! paths the units name, since verify checks that ExecStart programs exist).

use std::path::Path;
use std::process::Command;

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        println!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    for unit in ["qcoord.service", "qworker.service"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Point ExecStart at a program that exists here; everything else is verified as written.
        let patched = text.replace("/usr/local/bin/qcoord", "/bin/true").replace("/usr/local/bin/qworker", "/bin/true");
        std::fs::write(dir.path().join(unit), patched).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(dir.path().join(unit)).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let relevant: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(unit) && !l.contains("Failed to resolve user") && !l.contains("Failed to resolve group"))
            .collect();
        assert!(out.status.success() || relevant.is_empty(), "{unit}: {stderr}");
        assert!(relevant.is_empty(), "{unit}: {}", relevant.join("\n"));
    }
}

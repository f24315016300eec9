//! `scripts/check-requirements`, which `scripts/setup` runs after installing: every command rrr
//! needs is really there, or it stops naming the command and its package. (Not a test of apt:
//! of the check.)

use std::process::Command;

fn check(requirements: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("requirements");
    std::fs::write(&file, requirements).unwrap();
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/check-requirements"
    ))
    .arg(&file)
    .output()
    .expect("cannot run scripts/check-requirements")
}

#[test]
fn present_commands_pass() {
    let out = check("# comment\nsh dash\n\ncat coreutils\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_missing_command_stops_setup_naming_it_and_its_package() {
    let out = check("sh dash\nrrr-no-such-command rrr-fake-package\n");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'rrr-no-such-command' is not installed")
            && stderr.contains("rrr-fake-package")
            && stderr.contains("1 command(s) missing"),
        "{stderr}"
    );
}

#[test]
fn the_real_list_holds_on_this_machine() {
    // The suite runs after scripts/setup, so the project's own list must hold here.
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/check-requirements"
    ))
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

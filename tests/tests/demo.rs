//! The README's first command: the demo runs on its own and reports a match.

use ferry_tests::binary;

#[test]
fn the_demo_runs_end_to_end_and_both_sides_match() {
    let out = std::process::Command::new(binary("ferry-demo"))
        .output()
        .expect("run ferry-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ferry demo: OK, the copy matches the app"),
        "{stdout}"
    );
    for line in [
        "table phone: 3 rows in the app, 3 in the copy: identical",
        "table report: 3 rows in the app, 3 in the copy: identical",
        "media r3.jpg: identical",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
}

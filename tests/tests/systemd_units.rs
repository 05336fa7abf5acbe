//! The shipped systemd files: both units pass `systemd-analyze verify` with no
//! message at all (with ExecStart= pointed at the built binaries), and the
//! sysusers and tmpfiles snippets create the users and directories they promise
//! in a scratch root.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::binary;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn verify(unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze (package systemd; tests/run installs it)");
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), msg)
}

#[test]
fn both_units_verify_without_a_message() {
    let dir = tempfile::tempdir().unwrap();
    for agent in ["sender", "receiver"] {
        let name = format!("ferry-{agent}.service");
        let text = std::fs::read_to_string(systemd_dir().join(&name)).unwrap();
        for key in [
            "Type=notify",
            "Restart=on-failure",
            "ProtectSystem=strict",
            "ReadWritePaths=",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "WatchdogSec=",
        ] {
            assert!(text.contains(key), "{name} lacks {key}");
        }
        let bin = binary(&format!("ferry-{agent}"));
        let unit = dir.path().join(&name);
        std::fs::write(
            &unit,
            text.replace(&format!("/usr/bin/ferry-{agent}"), bin.to_str().unwrap()),
        )
        .unwrap();
        let (ok, msg) = verify(&unit);
        assert!(ok && msg.trim().is_empty(), "{name}: {msg}");
    }
    // The check can fail: an unknown key is reported.
    let broken = dir.path().join("ferry-broken.service");
    std::fs::write(
        &broken,
        "[Service]\nExecStart=/bin/true\nProtectSytem=strict\n",
    )
    .unwrap();
    let (_, msg) = verify(&broken);
    assert!(msg.contains("ProtectSytem"), "{msg}");
}

#[test]
fn sysusers_and_tmpfiles_create_the_users_and_directories() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let ok = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(systemd_dir().join("ferry-sender.sysusers.conf"))
        .arg(systemd_dir().join("ferry-receiver.sysusers.conf"))
        .status()
        .unwrap();
    assert!(ok.success());
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let uid = |user: &str| -> u32 {
        let line = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap_or_else(|| panic!("{user} not created:\n{passwd}"));
        assert!(line.ends_with("/usr/sbin/nologin"), "{line}");
        line.split(':').nth(2).unwrap().parse().unwrap()
    };
    let (sender, receiver) = (uid("ferry-sender"), uid("ferry-receiver"));
    let ok = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(systemd_dir().join("ferry-sender.tmpfiles.conf"))
        .arg(systemd_dir().join("ferry-receiver.tmpfiles.conf"))
        .status()
        .unwrap();
    assert!(ok.success());
    for (path, owner, mode) in [
        ("etc/ferry", 0, 0o755),
        ("var/lib/ferry-sender", sender, 0o700),
        ("var/lib/ferry-receiver", receiver, 0o700),
        ("srv/ferry/inbox", receiver, 0o2770),
    ] {
        let m = std::fs::metadata(root.path().join(path)).unwrap();
        assert_eq!(m.uid(), owner, "{path} owner");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{path} mode");
    }
}

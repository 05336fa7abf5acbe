//! ferry-receiver: not implemented yet (issue 3). It exists so the workspace has its
//! final shape; it refuses every command with a clear message and a non-zero exit.

fn main() -> std::process::ExitCode {
    eprintln!(
        "ferry-receiver is not implemented yet: bundles can be built with ferry-sender and \
         read with `tar --zstd -xf BUNDLE` (see docs/bundle-format.md)"
    );
    std::process::ExitCode::from(2)
}

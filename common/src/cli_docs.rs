//! Man pages (section 1, one per command and subcommand) and shell
//! completions (bash, zsh, fish) from an agent's clap definition, for the
//! packages: `ferry-sender generate-docs DIR` writes `DIR/man/*.1` and
//! `DIR/completions/{bash,zsh,fish}/…`.

use std::path::{Path, PathBuf};

/// Writes the man pages and completions of `cmd` under `dir`; returns the
/// files written.
pub fn generate(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    let mut cmd = cmd;
    cmd.build();
    write_man(&cmd, &man, cmd.get_name(), &mut written)?;
    let name = cmd.get_name().to_owned();
    for (shell, sub, file) in [
        (clap_complete::Shell::Bash, "bash", name.clone()),
        (clap_complete::Shell::Zsh, "zsh", format!("_{name}")),
        (clap_complete::Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = dir.join("completions").join(sub);
        std::fs::create_dir_all(&d)?;
        let path = d.join(file);
        let mut f = std::fs::File::create(&path)?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut f);
        written.push(path);
    }
    Ok(written)
}

fn write_man(
    cmd: &clap::Command,
    dir: &Path,
    name: &str,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut f = std::fs::File::create(&path)?;
    clap_mangen::Man::new(page).render(&mut f)?;
    written.push(path);
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_man(sub, dir, &format!("{name}-{}", sub.get_name()), written)?;
    }
    Ok(())
}

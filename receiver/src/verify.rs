//! Verification before anything commits: the whole bundle is read once, every
//! member checked (manifest first, safe relative paths, regular files only, listed
//! once, exact size and SHA-256, decompressed total bounded) and staged as a file.
//! Loading reads only these staged, verified files.

use ferry_common::manifest::{Manifest, Member};
use ferry_common::reader::{Limits, ReadError, read_bundle};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

/// A verified bundle: its manifest and every member as a staged file.
pub struct Verified {
    pub manifest: Manifest,
    files: HashMap<String, PathBuf>,
    dir: PathBuf,
}

impl Verified {
    /// The staged file of a member.
    pub fn file(&self, member: &Member) -> &Path {
        &self.files[&member.path]
    }

    pub fn text(&self, path: &str) -> io::Result<String> {
        match self.files.get(path) {
            Some(f) => std::fs::read_to_string(f),
            None => Ok(String::new()),
        }
    }
}

impl Drop for Verified {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads, verifies and stages a bundle into `dir` (emptied first). Blocking.
pub fn stage(bundle: &Path, dir: &Path, max_bytes: u64) -> Result<Verified, ReadError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    })?;
    let mut files = HashMap::new();
    let limits = Limits {
        max_bytes,
        ..Limits::default()
    };
    let mut n = 0u64;
    let result = read_bundle(bundle, &limits, |m, r| {
        n += 1;
        let path = dir.join(format!("m{n}"));
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(&path)?);
        io::copy(r, &mut out)?;
        io::Write::flush(&mut out)?;
        files.insert(m.path.clone(), path);
        Ok(())
    });
    match result {
        Ok(manifest) => Ok(Verified {
            manifest,
            files,
            dir: dir.to_owned(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

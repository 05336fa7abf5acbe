//! Assembling a bundle: a writer thread takes staged members (compressed
//! already, by the threads that produced them) as extraction finishes them and
//! appends them to the bundle body. The manifest is written last (as the first frame; see
//! `ferry_common::bundle`).

use crate::extract::{ExtractError, Staged};
use ferry_common::bundle::{BundleWriter, Compression, WriteError};
use ferry_common::manifest::Member;
use std::path::Path;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The writer thread and the queue that feeds it.
pub struct Assembly {
    pub tx: mpsc::Sender<Staged>,
    handle: JoinHandle<Result<BundleWriter, WriteError>>,
}

impl Assembly {
    /// Starts a writer whose body is staged at `body_path`.
    pub fn start(body_path: &Path, compression: Compression) -> Result<Self, WriteError> {
        let mut writer = BundleWriter::create(body_path, compression)?;
        // A short queue: members are files on disk, so this bounds nothing but
        // the number of staged files waiting.
        let (tx, mut rx) = mpsc::channel::<Staged>(16);
        let handle = tokio::task::spawn_blocking(move || {
            while let Some(staged) = rx.blocking_recv() {
                let result = writer.append_compressed(
                    staged.member,
                    staged.size,
                    staged.sha256,
                    &staged.file,
                );
                let _ = std::fs::remove_file(&staged.file);
                result?;
            }
            Ok(writer)
        });
        Ok(Self { tx, handle })
    }

    /// Waits for the writer once every sender of the queue is gone.
    pub async fn finish(self) -> Result<BundleWriter, ExtractError> {
        drop(self.tx);
        self.handle
            .await
            .map_err(|e| ExtractError::WriterGone(format!("bundle writer panicked: {e}")))?
            .map_err(|e| ExtractError::WriterGone(e.to_string()))
    }
}

/// Rows and bytes of data members, for logs and progress.
pub fn data_rows(members: &[Member]) -> u64 {
    members.iter().filter_map(|m| m.rows).sum()
}

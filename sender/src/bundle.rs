//! Assembling a bundle: a writer thread takes staged members (compressed
//! already, by the threads that produced them) as extraction finishes them and
//! appends them to the bundle body. The manifest is written last (as the first frame; see
//! `ferry_common::bundle`).
//!
//! A complete can be sent in volumes (`[bundle] volume_bytes`): each time the
//! body reaches the volume size, it is sealed as a bundle file of its own
//! (`<name>.v0001.tar.zst`, …) in the outbox, and the push that runs beside the
//! job delivers it while the dump goes on, so the receiver loads while the
//! sender dumps. The final file keeps the ordinary name and lists the whole set
//! (see `ferry_common::manifest::Volume`).

use crate::extract::{ExtractError, Staged};
use ferry_common::bundle::{BundleWriter, Compression, Signer, WriteError};
use ferry_common::manifest::{self, Manifest, Member, Volume, VolumeFile};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How a complete is cut into volumes.
pub struct VolumePlan {
    /// A volume is sealed once the body holds this many (compressed) bytes, or
    /// an eighth of everything written so far if that is more: volumes grow
    /// with the bundle, so a large complete is still few files.
    pub bytes: u64,
    /// The complete's manifest, members aside (every volume carries it).
    pub header: Manifest,
    pub outbox: PathBuf,
    /// Told how many volumes are sealed, for the push beside the job.
    pub sealed: Option<watch::Sender<u32>>,
    /// Signs each volume's manifest.
    pub signer: Option<Signer>,
}

/// The writer thread and the queue that feeds it.
pub struct Assembly {
    pub tx: mpsc::Sender<Staged>,
    handle: JoinHandle<Result<Assembled, WriteError>>,
}

/// What the writer thread made: the open last file, and the volumes sealed
/// before it. Dropped without [`keep`](Self::keep), it removes those volumes
/// from the outbox (the job failed; they must never be sent).
pub struct Assembled {
    writer: Option<BundleWriter>,
    volumes: Vec<(VolumeFile, Vec<Member>)>,
    set: String,
    outbox: PathBuf,
    kept: bool,
}

/// The signer of this sender's bundles ([`Config::signing_key`]), if any.
pub fn signer(config: &crate::Config) -> Result<Option<Signer>, crate::job::JobError> {
    let Some(path) = config.signing_key() else {
        return Ok(None);
    };
    let key = crate::keys::load(path).map_err(|e| {
        crate::job::JobError::SigningKey(format!(
            "the signing key (`[bundle] signing_key`, or `[push] key_file`; `[bundle] sign = \
             false` turns signing off): {e}"
        ))
    })?;
    Ok(Some(std::sync::Arc::new(move |digest: &str| {
        let sig = key
            .sign(
                ferry_common::bundle::SIGNATURE_NAMESPACE,
                russh::keys::HashAlg::Sha512,
                digest.as_bytes(),
            )
            .map_err(std::io::Error::other)?;
        sig.to_pem(russh::keys::ssh_key::LineEnding::LF)
            .map_err(std::io::Error::other)
    })))
}

impl Assembly {
    /// Starts a writer whose body is staged at `body_path`.
    pub fn start(
        body_path: &Path,
        compression: Compression,
        plan: Option<VolumePlan>,
    ) -> Result<Self, WriteError> {
        let mut writer = BundleWriter::create(body_path, compression)?;
        let body_path = body_path.to_owned();
        // A short queue: members are files on disk, so this bounds nothing but
        // the number of staged files waiting.
        let (tx, mut rx) = mpsc::channel::<Staged>(16);
        let handle = tokio::task::spawn_blocking(move || {
            let mut done = Assembled {
                writer: None,
                volumes: Vec::new(),
                set: format!("{:016x}", rand::random::<u64>()),
                outbox: plan.as_ref().map(|p| p.outbox.clone()).unwrap_or_default(),
                kept: false,
            };
            let (mut body, mut written) = (0u64, 0u64);
            while let Some(staged) = rx.blocking_recv() {
                let compressed = std::fs::metadata(&staged.file).map_or(0, |m| m.len());
                let result = writer.append_compressed(
                    staged.member,
                    staged.size,
                    staged.checksum,
                    &staged.file,
                );
                let _ = std::fs::remove_file(&staged.file);
                result?;
                body += compressed;
                written += compressed;
                if let Some(plan) = &plan
                    && body >= plan.bytes.max(written / 8)
                {
                    // A body path of its own: sealing removes the old one's.
                    let next_body =
                        body_path.with_extension(format!("v{}", done.volumes.len() + 2));
                    let next = BundleWriter::create(&next_body, compression)?;
                    done.seal(std::mem::replace(&mut writer, next), plan)?;
                    body = 0;
                }
            }
            done.writer = Some(writer);
            Ok(done)
        });
        Ok(Self { tx, handle })
    }

    /// Waits for the writer once every sender of the queue is gone.
    pub async fn finish(self) -> Result<Assembled, ExtractError> {
        drop(self.tx);
        self.handle
            .await
            .map_err(|e| ExtractError::WriterGone(format!("bundle writer panicked: {e}")))?
            .map_err(|e| ExtractError::WriterGone(e.to_string()))
    }
}

impl Assembled {
    /// Writes `writer`'s members as the next volume, durably, into the outbox.
    fn seal(&mut self, writer: BundleWriter, plan: &VolumePlan) -> Result<(), WriteError> {
        let index = self.volumes.len() as u32 + 1;
        let h = &plan.header;
        let file = manifest::volume_file_name(&h.sender_id, &h.chain, h.seq, h.kind, index);
        let m = Manifest {
            members: writer.members().to_vec(),
            volume: Some(Volume {
                set: self.set.clone(),
                index,
                earlier: Vec::new(),
            }),
            ..h.clone()
        };
        let (size, sha256) =
            writer.finish_signed(&m, &plan.outbox.join(&file), plan.signer.as_ref())?;
        tracing::debug!(volume = %file, size, members = m.members.len(), "volume sealed");
        self.volumes
            .push((VolumeFile { file, size, sha256 }, m.members));
        if let Some(tx) = &plan.sealed {
            let _ = tx.send(index);
        }
        Ok(())
    }

    /// Every member of the bundle: those of the volumes (marked with the volume
    /// that holds them), then the last file's own.
    pub fn members(&self) -> Vec<Member> {
        let mut out = Vec::new();
        for (i, (_, members)) in self.volumes.iter().enumerate() {
            out.extend(members.iter().map(|m| Member {
                volume: Some(i as u32 + 1),
                ..m.clone()
            }));
        }
        out.extend_from_slice(self.writer.as_ref().map_or(&[], |w| w.members()));
        out
    }

    /// The final file's volume header; `None` for a bundle in one file.
    pub fn volume(&self) -> Option<Volume> {
        (!self.volumes.is_empty()).then(|| Volume {
            set: self.set.clone(),
            index: self.volumes.len() as u32 + 1,
            earlier: self.volumes.iter().map(|(f, _)| f.clone()).collect(),
        })
    }

    /// The size of the volumes sealed.
    pub fn volume_bytes(&self) -> u64 {
        self.volumes.iter().map(|(f, _)| f.size).sum()
    }

    /// The writer of the last file.
    pub fn take_writer(&mut self) -> Option<BundleWriter> {
        self.writer.take()
    }

    /// The bundle is committed: its volumes stay.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Assembled {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for (f, _) in &self.volumes {
            let path = self.outbox.join(&f.file);
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(volume = %f.file, "removed a volume of a bundle that was not finished");
            }
        }
    }
}

/// Rows and bytes of data members, for logs and progress.
pub fn data_rows(members: &[Member]) -> u64 {
    members.iter().filter_map(|m| m.rows).sum()
}

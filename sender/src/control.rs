//! The sender's HTTP control endpoint (`[control]`, off by default): snapshots
//! on demand, as lovely.gae.snapshot took them over HTTP, and the status.
//!
//! - `POST /v1/snapshots` with an optional body `{"tables": ["public.orders"]}`
//!   queues a complete (of those tables only, see `complete --table`) and
//!   answers `202 {"id": …}`; while one is queued or running, another is
//!   refused with `409` and the running one's id.
//! - `GET /v1/snapshots/{id}`: `queued`, `extracting`, `pushing`, then
//!   `delivered` (or `written` without `[push]`), or `failed` with the error.
//! - `GET /v1/status`: what `ferry-sender status --json` prints.
//!
//! Every request needs `Authorization: Bearer <token>`, the token read from
//! `token_file` at start; a wrong one gets `401` and triggers nothing. Plain
//! HTTP on loopback: put TLS in a reverse proxy (docs/control.md).

use crate::config::Config;
use ferry_common::http::{Handler, Request, Response, Server};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Where a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Queued,
    Extracting,
    Pushing,
    /// In the receiver's inbox.
    Delivered,
    /// In the outbox (no `[push]` section).
    Written,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub id: String,
    /// Empty: every selected table.
    pub tables: Vec<String>,
    pub status: Stage,
    pub error: Option<String>,
    /// The bundle, once written.
    pub seq: Option<u64>,
    pub file: Option<String>,
    pub requested_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The snapshots this daemon was asked for (kept in memory, newest 100).
#[derive(Default)]
pub struct Snapshots {
    all: Mutex<BTreeMap<String, Snapshot>>,
}

impl Snapshots {
    /// Moves snapshot `id` on.
    pub fn set(&self, id: &str, status: Stage, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut all) = self.all.lock()
            && let Some(s) = all.get_mut(id)
        {
            s.status = status;
            s.updated_at = chrono::Utc::now();
            f(s);
        }
    }

    fn get(&self, id: &str) -> Option<Snapshot> {
        self.all.lock().ok()?.get(id).cloned()
    }

    /// The snapshot queued or running, if any.
    fn active(&self) -> Option<Snapshot> {
        self.all
            .lock()
            .ok()?
            .values()
            .find(|s| matches!(s.status, Stage::Queued | Stage::Extracting | Stage::Pushing))
            .cloned()
    }

    fn add(&self, s: Snapshot) {
        if let Ok(mut all) = self.all.lock() {
            while all.len() >= 100 {
                let oldest = all
                    .values()
                    .min_by_key(|s| s.requested_at)
                    .map(|s| s.id.clone());
                match oldest {
                    Some(id) => all.remove(&id),
                    None => break,
                };
            }
            all.insert(s.id.clone(), s);
        }
    }
}

/// A snapshot for the daemon to take.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: String,
    pub tables: Vec<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    #[serde(default)]
    tables: Vec<String>,
}

/// Starts the endpoint; orders arrive on the returned receiver.
pub async fn serve(
    config: &Arc<Config>,
    snapshots: Arc<Snapshots>,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, mpsc::Receiver<Order>)>> {
    let Some(c) = &config.control else {
        return Ok(None);
    };
    let token =
        Arc::new(ferry_common::http::read_token(&c.token_file).map_err(anyhow::Error::msg)?);
    let server = Server::bind(c.listen, "control.listen")
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(listen = %server.local_addr()?, "control endpoint listening");
    let (tx, rx) = mpsc::channel::<Order>(4);
    let config = Arc::clone(config);
    let handler: Handler = Arc::new(move |req: Request| {
        let token = Arc::clone(&token);
        let snapshots = Arc::clone(&snapshots);
        let tx = tx.clone();
        let config = Arc::clone(&config);
        Box::pin(async move {
            if !req.bearer_is(&token) {
                tracing::warn!(path = %req.path, "control request refused: missing or wrong bearer token");
                return Response::error(
                    401,
                    "missing or wrong bearer token (Authorization: Bearer <token from control.token_file>)",
                );
            }
            route(&config, &snapshots, &tx, req).await
        })
    });
    Ok(Some((tokio::spawn(server.serve(handler)), rx)))
}

async fn route(
    config: &Config,
    snapshots: &Snapshots,
    tx: &mpsc::Sender<Order>,
    req: Request,
) -> Response {
    let path = req.path.trim_end_matches('/');
    match (req.method.as_str(), path) {
        ("POST", "/v1/snapshots") => {
            let body: SnapshotBody = if req.body.iter().all(u8::is_ascii_whitespace) {
                SnapshotBody::default()
            } else {
                match serde_json::from_slice(&req.body) {
                    Ok(b) => b,
                    Err(e) => {
                        return Response::error(
                            400,
                            format!("the body is not {{\"tables\": [\"schema.table\", …]}}: {e}"),
                        );
                    }
                }
            };
            if let Some(active) = snapshots.active() {
                return Response::json(
                    409,
                    &serde_json::json!({
                        "error": "a snapshot is already queued or running; poll it, then ask again",
                        "id": active.id,
                        "status": active.status,
                    }),
                );
            }
            let now = chrono::Utc::now();
            let id = format!(
                "{}-{:08x}",
                now.format("%Y%m%dT%H%M%SZ"),
                rand::random::<u32>()
            );
            snapshots.add(Snapshot {
                id: id.clone(),
                tables: body.tables.clone(),
                status: Stage::Queued,
                error: None,
                seq: None,
                file: None,
                requested_at: now,
                updated_at: now,
            });
            if tx
                .send(Order {
                    id: id.clone(),
                    tables: body.tables,
                })
                .await
                .is_err()
            {
                snapshots.set(&id, Stage::Failed, |s| {
                    s.error = Some("the daemon is stopping".into())
                });
                return Response::error(503, "the daemon is stopping");
            }
            tracing::info!(%id, "snapshot requested over HTTP");
            Response::json(202, &snapshots.get(&id))
        }
        ("GET", "/v1/status") => match crate::report::status(config).await {
            Ok(s) => Response::json(200, &s),
            Err(e) => Response::error(500, format!("{e:#}")),
        },
        ("GET", p) if p.starts_with("/v1/snapshots/") => {
            match snapshots.get(&p["/v1/snapshots/".len()..]) {
                Some(s) => Response::json(200, &s),
                None => Response::error(404, "no such snapshot (ids live as long as the daemon)"),
            }
        }
        _ => Response::error(
            404,
            "POST /v1/snapshots, GET /v1/snapshots/{id}, GET /v1/status",
        ),
    }
}

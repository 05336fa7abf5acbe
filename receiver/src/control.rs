//! The receiver's HTTP control endpoint (`[control]`, off by default), read
//! only: `GET /v1/status` (what `ferry-receiver status --json` prints) and
//! `GET /v1/bundles/{file}` (whether that bundle is applied, waiting in the
//! inbox, or quarantined and why). A bearer token from `token_file` guards
//! both, as on the sender ([`ferry_sender`'s control]); plain HTTP on
//! loopback, TLS in a reverse proxy.

use crate::config::Config;
use crate::load::Target;
use ferry_common::http::{Handler, Request, Response, Server};
use std::sync::Arc;

/// Starts the endpoint when `[control]` is set.
pub async fn serve(config: &Config) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(c) = &config.control else {
        return Ok(None);
    };
    let token =
        Arc::new(ferry_common::http::read_token(&c.token_file).map_err(anyhow::Error::msg)?);
    let server = Server::bind(c.listen, "control.listen")
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(listen = %server.local_addr()?, "control endpoint listening");
    let config = Arc::new(config.clone());
    let handler: Handler = Arc::new(move |req: Request| {
        let token = Arc::clone(&token);
        let config = Arc::clone(&config);
        Box::pin(async move {
            if !req.bearer_is(&token) {
                tracing::warn!(path = %req.path, "control request refused: missing or wrong bearer token");
                return Response::error(
                    401,
                    "missing or wrong bearer token (Authorization: Bearer <token from control.token_file>)",
                );
            }
            route(&config, req).await
        })
    });
    Ok(Some(tokio::spawn(server.serve(handler))))
}

async fn route(config: &Config, req: Request) -> Response {
    let path = req.path.trim_end_matches('/');
    match (req.method.as_str(), path) {
        ("GET", "/v1/status") => match crate::report::status(config).await {
            Ok(s) => Response::json(200, &s),
            Err(e) => Response::error(500, format!("{e:#}")),
        },
        ("GET", p) if p.starts_with("/v1/bundles/") => {
            bundle(config, &p["/v1/bundles/".len()..]).await
        }
        _ => Response::error(404, "GET /v1/status, GET /v1/bundles/{file}"),
    }
}

/// Where one bundle is: applied (with when), quarantined (with why), in the
/// inbox (waiting), or unknown here.
async fn bundle(config: &Config, file: &str) -> Response {
    if let Ok(list) = crate::quarantine::list(&config.quarantine_dir())
        && let Some(f) = list.into_iter().find(|f| f.file == file)
    {
        return Response::json(
            200,
            &serde_json::json!({ "file": file, "state": "quarantined", "reason": f.report }),
        );
    }
    let applied = match Target::connect(config).await {
        Ok(mut t) => t.applied_all().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match applied {
        Ok(rows) => {
            if let Some(r) = rows.into_iter().find(|r| r.file == file) {
                return Response::json(
                    200,
                    &serde_json::json!({
                        "file": file, "state": "applied", "seq": r.seq, "kind": r.kind,
                        "created_at": r.created_at, "applied_at": r.applied_at,
                    }),
                );
            }
        }
        Err(e) => {
            return Response::error(503, format!("the target database cannot be asked: {e}"));
        }
    }
    if config.inbox.join(file).exists() {
        return Response::json(
            200,
            &serde_json::json!({ "file": file, "state": "waiting", "detail": "in the inbox, not applied yet (`ferry-receiver status` says why if it is held)" }),
        );
    }
    Response::json(
        404,
        &serde_json::json!({ "file": file, "state": "unknown", "error": "not applied, not in the inbox, not in quarantine" }),
    )
}

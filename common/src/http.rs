//! The agents' small HTTP/1 endpoints (Prometheus metrics; the sender's
//! snapshots on demand): a request reduced to what the handlers read, and a
//! server on the tokio runtime. Loopback by default in every example; TLS is
//! left to a reverse proxy.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// Request bodies larger than this are refused (413).
pub const MAX_BODY: usize = 64 << 10;

/// What a handler sees of a request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    /// Whether the request carries `Authorization: Bearer <token>`.
    pub fn bearer_is(&self, token: &str) -> bool {
        self.authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A handler's answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// `{"error": "…"}` with `status`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// A bound listener; [`Server::serve`] answers until the task is dropped.
pub struct Server {
    listener: tokio::net::TcpListener,
}

impl Server {
    /// Binds `addr`; the error names the setting and the fix.
    pub async fn bind(addr: SocketAddr, setting: &str) -> Result<Self, String> {
        tokio::net::TcpListener::bind(addr)
            .await
            .map(|listener| Self { listener })
            .map_err(|e| format!("could not listen on {addr} (`{setting}`): {e}; pick a free port, or stop what holds it"))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, handler: Handler) {
        loop {
            let Ok((stream, peer)) = self.listener.accept().await else {
                continue;
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = Arc::clone(&handler);
                    async move { Ok::<_, std::convert::Infallible>(answer(handler, req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
            });
        }
    }
}

async fn answer(
    handler: Handler,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let response = match Limited::new(body, MAX_BODY).collect().await {
        Ok(body) => {
            let request = Request {
                method: parts.method.as_str().to_owned(),
                path: parts.uri.path().to_owned(),
                authorization: parts
                    .headers
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: body.to_bytes().to_vec(),
            };
            handler(request).await
        }
        Err(_) => Response::error(413, format!("the body is over {MAX_BODY} bytes")),
    };
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() = hyper::StatusCode::from_u16(response.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(response.content_type) {
        out.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    out
}

/// The OpenMetrics content type Prometheus asks for.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads a bearer token from `path` (`control.token_file`): the content,
/// trimmed, at least 16 characters, in a file not readable by every user.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "control.token_file {shown}: {e}; write a long random token there \
             (e.g. `openssl rand -hex 32 > {shown}`, mode 0640)"
        )
    })?;
    if meta.mode() & 0o007 != 0 {
        return Err(format!(
            "control.token_file {shown} is readable by every user (mode {:04o}): `chmod 0640 {shown}`",
            meta.mode() & 0o777
        ));
    }
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("control.token_file {shown}: {e}"))?
        .trim()
        .to_owned();
    if token.len() < 16 {
        return Err(format!(
            "control.token_file {shown} holds {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
            token.len()
        ));
    }
    Ok(token)
}

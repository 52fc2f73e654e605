//! The coordinator's side of transport security: TLS on the gRPC listener (optionally requiring client
//! certificates signed by a given CA) and bearer tokens per service.
//!
//! Roles and what they may call:
//! - **users** (`--token-file`): the `Coordinator` service (`qctl`: submit, status, logs, cancel, nodes);
//! - **workers** (`--worker-token-file`): `WorkerControl` (register, heartbeat, assignments, reports) and
//!   `Rendezvous` (the rank processes of a worker carry its token).
//!
//! With only one of the two files given, it guards every service. Health (`grpc.health.v1`) and reflection stay
//! open so probes and `grpcurl list` work; they reveal no job data. With no token file nothing is checked (the
//! default listen address is loopback).
//!
//! Revocation: a token file is re-read when its modification time changes, so deleting a worker's line locks
//! that worker out at its next call (it can no longer register or heartbeat). Tokens are compared in constant
//! time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tonic::service::Interceptor;
use tonic::{Request, Status};

/// TLS settings of the listener (PEM bytes).
#[derive(Clone)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
}

/// Everything the listener checks (see the module docs).
#[derive(Clone, Default)]
pub struct ServerSecurity {
    pub tls: Option<ServerTls>,
    pub user_tokens: Option<Arc<TokenFile>>,
    pub worker_tokens: Option<Arc<TokenFile>>,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecurity")
            .field("tls", &self.tls.as_ref().map(|t| if t.client_ca.is_some() { "mutual" } else { "server" }))
            .field("user_tokens", &self.user_tokens.as_ref().map(|t| t.path.display().to_string()))
            .field("worker_tokens", &self.worker_tokens.as_ref().map(|t| t.path.display().to_string()))
            .finish()
    }
}

impl ServerSecurity {
    /// Reads the PEM files and token files (errors name the file).
    pub fn load(
        tls_cert: Option<&Path>,
        tls_key: Option<&Path>,
        client_ca: Option<&Path>,
        user_token_file: Option<&Path>,
        worker_token_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
        let tls = match (tls_cert, tls_key) {
            (Some(c), Some(k)) => Some(ServerTls { cert: read(c)?, key: read(k)?, client_ca: client_ca.map(read).transpose()? }),
            (None, None) if client_ca.is_none() => None,
            (None, None) => anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key"),
            _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
        };
        let tokens = |p: Option<&Path>| -> anyhow::Result<Option<Arc<TokenFile>>> {
            p.map(|p| TokenFile::open(p).map(Arc::new)).transpose()
        };
        Ok(ServerSecurity { tls, user_tokens: tokens(user_token_file)?, worker_tokens: tokens(worker_token_file)? })
    }

    /// The check for the `Coordinator` service.
    pub fn users(&self) -> RequireToken {
        RequireToken { role: "user", tokens: self.user_tokens.clone().or_else(|| self.worker_tokens.clone()) }
    }

    /// The check for `WorkerControl` and `Rendezvous`.
    pub fn workers(&self) -> RequireToken {
        RequireToken { role: "worker", tokens: self.worker_tokens.clone().or_else(|| self.user_tokens.clone()) }
    }
}

/// Tokens from a file: one per line, blank lines and `#` comments ignored; re-read when the file changes.
pub struct TokenFile {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<String>)>,
}

fn parse_tokens(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// Equality that takes the same time for every `b` of a given length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenFile {
    /// Reads `path` now (a missing or empty file is an error: it would lock everyone out).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let f = TokenFile { path: path.to_path_buf(), cache: Mutex::new((None, Vec::new())) };
        let n = f.refresh()?;
        anyhow::ensure!(n > 0, "{}: no tokens in the file", path.display());
        Ok(f)
    }

    /// Re-reads the file when its mtime changed; returns the number of tokens.
    fn refresh(&self) -> anyhow::Result<usize> {
        let meta = std::fs::metadata(&self.path).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        let mtime = meta.modified().ok();
        let mut cache = self.cache.lock().expect("token cache poisoned");
        if cache.0.is_none() || cache.0 != mtime {
            let text = std::fs::read_to_string(&self.path).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
            *cache = (mtime, parse_tokens(&text));
        }
        Ok(cache.1.len())
    }

    /// True when `token` is listed (after re-reading a changed file; an unreadable file denies everyone).
    pub fn allows(&self, token: &str) -> bool {
        if let Err(e) = self.refresh() {
            tracing::error!("token file: {e}");
            return false;
        }
        let cache = self.cache.lock().expect("token cache poisoned");
        cache.1.iter().fold(false, |found, t| found | constant_time_eq(t.as_bytes(), token.as_bytes()))
    }
}

/// A tonic interceptor requiring `authorization: Bearer <token>` from a [`TokenFile`] (no-op without one).
#[derive(Clone)]
pub struct RequireToken {
    role: &'static str,
    tokens: Option<Arc<TokenFile>>,
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.tokens else { return Ok(req) };
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(Status::unauthenticated(format!("a {} bearer token is required", self.role)));
        };
        if tokens.allows(token.trim()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(format!("the {} token is not valid (unknown or revoked)", self.role)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_revocation_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers.tokens");
        std::fs::write(&path, "# workers\nalpha\n\nbeta\n").unwrap();
        let f = Arc::new(TokenFile::open(&path).unwrap());
        assert!(f.allows("alpha") && f.allows("beta") && !f.allows("gamma") && !f.allows("alph"));
        let mut check = RequireToken { role: "worker", tokens: Some(f.clone()) };
        let with = |t: Option<&str>| {
            let mut r = Request::new(());
            if let Some(t) = t {
                r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            r
        };
        assert_eq!(check.call(with(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(check.call(with(Some("gamma"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(check.call(with(Some("beta"))).is_ok());
        // Revoke beta: the file's mtime changes, the next call re-reads it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "alpha\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert!(check.call(with(Some("beta"))).is_err());
        assert!(check.call(with(Some("alpha"))).is_ok());
        std::fs::write(dir.path().join("empty"), "# nothing\n").unwrap();
        assert!(TokenFile::open(&dir.path().join("empty")).is_err());
    }
}

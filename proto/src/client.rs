//! How every qcluster client reaches the coordinator: `qctl`, `qworker` and the rank processes build their gRPC
//! channels here, so TLS and the bearer token are handled the same way everywhere.
//!
//! - **TLS** is used for `https://` URLs, verifying the server against `ca_cert` (a PEM file; the system roots
//!   are not consulted) and presenting a client certificate when `identity` is set (mutual TLS). An `http://`
//!   URL with TLS material configured is refused, so a typo cannot silently downgrade to plaintext.
//! - **Bearer token**: when set, every request carries `authorization: Bearer <token>` ([`BearerToken`]).
//!
//! [`ClientSecurity::from_env`] reads the settings every binary shares: `QCLUSTER_TOKEN` or
//! `QCLUSTER_TOKEN_FILE`, `QCLUSTER_CA_CERT`, `QCLUSTER_CLIENT_CERT` + `QCLUSTER_CLIENT_KEY` (file paths).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel that adds the bearer token (if any) to every request.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Adds `authorization: Bearer <token>` to every request (nothing when empty).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        match token {
            None => Ok(BearerToken(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {}", t.trim()))
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| ClientError::Config("the token must be printable ASCII".into())),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Errors building a client channel; each names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("{url}: {source}")]
    Transport { url: String, source: tonic::transport::Error },
}

/// TLS and token settings of a client (see the module docs).
#[derive(Clone, Default)]
pub struct ClientSecurity {
    pub token: Option<String>,
    /// PEM of the CA that signed the coordinator's certificate.
    pub ca_cert: Option<Vec<u8>>,
    /// PEM certificate + key for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The files the PEMs came from (`ca`, `cert`, `key`), handed on to child processes by [`Self::env_vars`].
    pub files: [Option<PathBuf>; 3],
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read { path: path.to_path_buf(), source })
}

/// The first non-empty, non-comment line of a token file.
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let text = String::from_utf8(read(path)?).map_err(|_| ClientError::Config(format!("{}: not UTF-8", path.display())))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .ok_or_else(|| ClientError::Config(format!("{}: no token in the file", path.display())))
}

impl ClientSecurity {
    /// Settings from paths (any may be absent); `token` wins over `token_file`.
    pub fn load(
        token: Option<String>,
        token_file: Option<&Path>,
        ca_cert: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let token = match (token.filter(|t| !t.trim().is_empty()), token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(read_token_file(f)?),
            (None, None) => None,
        };
        let identity = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => return Err(ClientError::Config("a client certificate needs both the certificate and the key".into())),
        };
        let files = [ca_cert, client_cert, client_key].map(|p| p.map(Path::to_path_buf));
        Ok(ClientSecurity { token, ca_cert: ca_cert.map(read).transpose()?, identity, files })
    }

    /// The environment that makes [`Self::from_env`] in a child process (a rank) rebuild these settings.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = Vec::new();
        if let Some(t) = &self.token {
            vars.push(("QCLUSTER_TOKEN".to_string(), t.clone()));
        }
        for (name, file) in ["QCLUSTER_CA_CERT", "QCLUSTER_CLIENT_CERT", "QCLUSTER_CLIENT_KEY"].iter().zip(&self.files) {
            if let Some(f) = file {
                vars.push((name.to_string(), f.display().to_string()));
            }
        }
        vars
    }

    /// Settings from `QCLUSTER_TOKEN` / `QCLUSTER_TOKEN_FILE`, `QCLUSTER_CA_CERT`, `QCLUSTER_CLIENT_CERT` /
    /// `QCLUSTER_CLIENT_KEY`.
    pub fn from_env() -> Result<Self, ClientError> {
        let path = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self::load(
            std::env::var("QCLUSTER_TOKEN").ok(),
            path("QCLUSTER_TOKEN_FILE").as_deref(),
            path("QCLUSTER_CA_CERT").as_deref(),
            path("QCLUSTER_CLIENT_CERT").as_deref(),
            path("QCLUSTER_CLIENT_KEY").as_deref(),
        )
    }

    /// The endpoint for `url` with TLS configured as the module docs say.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ClientError> {
        let transport = |source| ClientError::Transport { url: url.to_string(), source };
        let mut ep = Endpoint::from_shared(url.to_string()).map_err(transport)?.connect_timeout(Duration::from_secs(5));
        let tls_material = self.ca_cert.is_some() || self.identity.is_some();
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            match &self.ca_cert {
                Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(ca)),
                None => {
                    return Err(ClientError::Config(format!(
                        "{url}: TLS needs the coordinator's CA certificate (QCLUSTER_CA_CERT or --ca-cert)"
                    )));
                }
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            ep = ep.tls_config(tls).map_err(transport)?;
        } else if tls_material {
            return Err(ClientError::Config(format!(
                "{url}: TLS certificates are configured but the URL is not https://"
            )));
        }
        Ok(ep)
    }

    fn wrap(&self, channel: Channel) -> Result<AuthChannel, ClientError> {
        Ok(InterceptedService::new(channel, BearerToken::new(self.token.as_deref())?))
    }

    /// Connects now (fails when the coordinator is unreachable or the TLS handshake fails).
    pub async fn connect(&self, url: &str) -> Result<AuthChannel, ClientError> {
        let channel =
            self.endpoint(url)?.connect().await.map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        self.wrap(channel)
    }

    /// A channel that connects on first use (and reconnects after failures).
    pub fn connect_lazy(&self, url: &str) -> Result<AuthChannel, ClientError> {
        let channel = self.endpoint(url)?.connect_lazy();
        self.wrap(channel)
    }
}

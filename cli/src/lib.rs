//! Pieces shared by the qcluster binaries (`qcoord`, `qworker`, `qctl`), so each flag and endpoint means the
//! same everywhere: the log format ([`LogFormat`], [`init_logging`]), the TLS / bearer-token flags of a client
//! of the coordinator ([`ClientSecurityArgs`]), and the Prometheus endpoint ([`serve_metrics`]).

use std::path::PathBuf;

use qcluster_proto::client::{ClientError, ClientSecurity};

/// How a daemon writes its log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event (timestamp, level, target, fields), for log shippers.
    Json,
}

/// Installs the global tracing subscriber: `RUST_LOG` filter (default `info`), text or JSON lines on stderr.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// TLS and bearer-token flags of a coordinator client (qctl, qworker). An `https://` coordinator URL turns TLS
/// on; see [`qcluster_proto::client`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientSecurityArgs {
    /// Bearer token for the coordinator (prefer --token-file: arguments are visible in `ps`).
    #[arg(long, env = "QCLUSTER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File whose first non-comment line is the bearer token.
    #[arg(long, env = "QCLUSTER_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate.
    #[arg(long, env = "QCLUSTER_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --client-key).
    #[arg(long, env = "QCLUSTER_CLIENT_CERT", global = true)]
    pub client_cert: Option<PathBuf>,
    #[arg(long, env = "QCLUSTER_CLIENT_KEY", global = true)]
    pub client_key: Option<PathBuf>,
}

impl ClientSecurityArgs {
    /// Reads the files the flags name (errors name the file).
    pub fn load(&self) -> Result<ClientSecurity, ClientError> {
        ClientSecurity::load(
            self.token.clone(),
            self.token_file.as_deref(),
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )
    }
}

/// Binds `addr` and serves `GET /metrics` (Prometheus text format, the body `scrape()` returns at each request)
/// in the background. Must be called inside a tokio runtime (it spawns there); binding is synchronous, so a
/// taken port is an error at once. Returns the bound address (useful with port 0).
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    scrape: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let scrape = scrape.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], scrape()) }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("metrics server on {bound}: {e}");
        }
    });
    Ok((bound, task))
}

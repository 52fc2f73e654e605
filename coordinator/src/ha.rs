//! High availability: several coordinators share their state in etcd and elect one leader, which alone
//! serves the API and schedules.
//!
//! Election is a lease plus a transaction on one key, `<prefix>/leader`, whose value is the leader's URL
//! (`--advertise-url`):
//! - a follower reads the key every [`HaConfig::poll`]; when it is absent, it grants itself a lease of
//!   [`HaConfig::lease_ttl`] and creates the key with that lease in a transaction conditioned on the key not
//!   existing (`create_revision == 0`). The one whose transaction succeeds leads; the others keep polling.
//! - the leader renews its lease every TTL/4. When it cannot confirm the lease for a whole TTL (etcd
//!   unreachable or the lease gone), or when a state write is refused by the fence (see below), it stops
//!   serving and [`HaCoordinator::wait`] returns an error: the daemon exits with status 1 and its supervisor
//!   (systemd `Restart=`) brings it back as a follower. A deposed leader never goes back to following
//!   in-process: its in-memory state is not to be trusted.
//! - a leader that dies (kill -9, power loss) keeps the key until its lease expires: a follower takes over
//!   after at most TTL + one poll interval. A graceful stop ([`HaCoordinator::stop`], SIGTERM, ctrl-c)
//!   revokes the lease, so a follower takes over within one poll interval.
//!
//! Invariants:
//! - At most one coordinator writes the state: every write of a leader is a transaction conditioned on the
//!   leader key still having the create-revision it created ([`crate::store::Fence`]), so a deposed leader
//!   that has not noticed yet cannot overwrite its successor's state.
//! - A new leader loads the whole state from etcd after it won, so it sees every write its predecessor had
//!   acknowledged; then it serves exactly like a restarted single coordinator: nodes come back disconnected
//!   and are declared lost unless they register again within the heartbeat timeout; the ranks their workers
//!   report still running are kept (the restart reconciliation in [`crate::cluster`]).
//! - Followers do not proxy. They answer every `Coordinator`, `WorkerControl` and `Rendezvous` call with
//!   `UNAVAILABLE` (message starting with "not the leader") and, when the leader is known, the metadata
//!   `x-qcluster-leader: <leader URL>` ([`qcluster_proto::leader`]); `qctl` and `qworker` take a list of
//!   coordinator URLs and follow the hint. Health and reflection are served by followers too; health reports
//!   the three qcluster services `NOT_SERVING` on a follower, so a load balancer's gRPC health check finds
//!   the leader.
//! - Not replicated: rank logs are files under each coordinator's `--state-dir` (put it on shared storage to
//!   keep logs across a failover), and rendezvous rooms live in the leader's memory (ranks that were meeting
//!   during a failover time out and their attempt is retried). Metrics are served by the leader only.

use crate::cluster::Cluster;
use crate::service::Api;
use crate::store::{EtcdConfig, EtcdStore, Fence};
use crate::{CoordinatorConfig, CoordinatorHandle};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use qcluster_proto::leader::{LEADER_METADATA_KEY, NOT_LEADER_PREFIX};
use qcluster_proto::v1::coordinator_server::CoordinatorServer;
use qcluster_proto::v1::rendezvous_server::RendezvousServer;
use qcluster_proto::v1::worker_control_server::WorkerControlServer;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// How a coordinator takes part in the election.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub etcd: EtcdConfig,
    /// The URL followers send clients to while this coordinator leads; `None`: `http(s)://<listen address>`
    /// (the host name when listening on all interfaces).
    pub advertise_url: Option<String>,
    /// Lifetime of the leader's lease (whole seconds, at least 1): how long a dead leader blocks a takeover.
    pub lease_ttl: Duration,
    /// How often a follower checks whether the leader key is free.
    pub poll: Duration,
}

impl HaConfig {
    pub fn new(etcd: EtcdConfig) -> HaConfig {
        HaConfig { etcd, advertise_url: None, lease_ttl: Duration::from_secs(3), poll: Duration::from_millis(250) }
    }
}

/// What a coordinator is doing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Redirects every call; `leader` is the URL of the current leader when one is known.
    Follower { leader: Option<String> },
    /// Serves and schedules.
    Leader,
    /// Stopped, or stepped down after losing the leadership.
    Stopped,
}

/// Errors of the HA machinery.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("--etcd-lease-ttl must be a whole number of seconds, at least 1 (got {0:?})")]
    LeaseTtl(Duration),
    #[error("lost the leadership: {0}")]
    LostLeadership(String),
}

/// A coordinator taking part in the election (see the module docs).
pub struct HaCoordinator {
    /// The address it listens on (as follower and as leader).
    pub addr: SocketAddr,
    /// The URL it advertises while it leads.
    pub advertise_url: String,
    role: watch::Receiver<Role>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<Result<(), HaError>>>,
}

struct Shared {
    client: Client,
    role: watch::Sender<Role>,
    /// The lease of a won (or possibly won) campaign, revoked by a graceful stop.
    lease: Mutex<Option<i64>>,
    follower: Mutex<Option<FollowerServer>>,
    keepalive: Mutex<Option<JoinHandle<()>>>,
    leader: tokio::sync::Mutex<Option<CoordinatorHandle>>,
    cluster: Mutex<Option<Arc<Cluster>>>,
}

/// Connects to etcd (failing at once when it does not answer), binds `config.listen`, serves as a follower
/// and campaigns in the background.
pub async fn start(config: CoordinatorConfig, ha: HaConfig) -> Result<HaCoordinator, HaError> {
    if ha.lease_ttl.subsec_nanos() != 0 || ha.lease_ttl.as_secs() == 0 {
        return Err(HaError::LeaseTtl(ha.lease_ttl));
    }
    let mut client = ha.etcd.client().await?;
    ha.etcd.check(&mut client).await?;
    let listen_err = |source| HaError::Listen { addr: config.listen, source };
    let listener = std::net::TcpListener::bind(config.listen).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    let advertise_url = ha.advertise_url.clone().unwrap_or_else(|| default_url(addr, config.security.tls.is_some()));
    let (role_tx, role_rx) = watch::channel(Role::Follower { leader: None });
    let follower = FollowerServer::start(&config, listener.try_clone().map_err(listen_err)?, role_rx.clone())
        .await
        .map_err(|e| HaError::Store(ha.etcd.error(format!("follower server: {e}"))))?;
    let shared = Arc::new(Shared {
        client,
        role: role_tx,
        lease: Mutex::new(None),
        follower: Mutex::new(Some(follower)),
        keepalive: Mutex::new(None),
        leader: tokio::sync::Mutex::new(None),
        cluster: Mutex::new(None),
    });
    tracing::info!("qcoord on {addr} (advertised as {advertise_url}) joins the election at {} on {}", ha.etcd.leader_key(), ha.etcd.endpoints.join(","));
    let task = tokio::spawn(run(config, ha, advertise_url.clone(), listener, shared.clone()));
    Ok(HaCoordinator { addr, advertise_url, role: role_rx, shared, task: Some(task) })
}

fn default_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
    } else {
        addr.ip().to_string()
    };
    format!("{scheme}://{host}:{}", addr.port())
}

impl HaCoordinator {
    /// `http://ADDR` of this coordinator's listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// The cluster, while this coordinator leads.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.shared.cluster.lock().unwrap().clone()
    }

    /// Waits until this coordinator leads (or `timeout` passes, or it stopped).
    pub async fn wait_leader(&self, timeout: Duration) -> bool {
        let mut role = self.role.clone();
        let decided = tokio::time::timeout(timeout, role.wait_for(|r| !matches!(r, Role::Follower { .. }))).await;
        matches!(decided, Ok(Ok(r)) if *r == Role::Leader)
    }

    /// Runs until the leadership is lost (an error) or the coordinator is stopped — the daemon's main loop.
    pub async fn wait(&mut self) -> Result<(), HaError> {
        let Some(task) = self.task.as_mut() else { return Ok(()) };
        let ended = task.await;
        self.task = None;
        match ended {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(HaError::LostLeadership(format!("the election task failed: {e}"))),
        }
    }

    /// Stops like a killed process: no more lease renewals, nothing revoked. A leader's key stays until its
    /// lease expires, so a follower takes over only after the TTL.
    pub async fn kill(mut self) {
        self.halt().await;
    }

    /// Stops and resigns: the lease is revoked, so a follower takes over within one poll interval.
    pub async fn stop(mut self) {
        self.halt().await;
        let lease = self.shared.lease.lock().unwrap().take();
        if let Some(lease) = lease {
            let mut client = self.shared.client.clone();
            match client.lease_revoke(lease).await {
                Ok(_) => tracing::info!("resigned: lease {lease:x} revoked"),
                Err(e) => tracing::warn!("could not revoke the leader lease (it expires by itself): {e}"),
            }
        }
    }

    async fn halt(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.stop_serving().await;
    }
}

impl Shared {
    async fn stop_serving(&self) {
        self.role.send_replace(Role::Stopped);
        if let Some(k) = self.keepalive.lock().unwrap().take() {
            k.abort();
        }
        let follower = self.follower.lock().unwrap().take();
        if let Some(f) = follower {
            f.stop().await;
        }
        self.cluster.lock().unwrap().take();
        if let Some(leader) = self.leader.lock().await.take() {
            leader.stop().await;
        }
    }
}

/// A won election.
struct Leadership {
    lease: i64,
    /// Of the leader key: the fence of every state write.
    create_revision: i64,
    granted_at: Instant,
}

async fn run(
    config: CoordinatorConfig,
    ha: HaConfig,
    advertise_url: String,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> Result<(), HaError> {
    let won = campaign(&shared, &ha, &advertise_url).await;
    let led = lead(config, &ha, won, listener, &shared).await;
    // Whatever ended the leadership (or kept it from starting), stop serving; the lease then expires.
    shared.stop_serving().await;
    led
}

/// Serves as leader until the leadership is lost (always an error).
async fn lead(
    config: CoordinatorConfig,
    ha: &HaConfig,
    won: Leadership,
    listener: std::net::TcpListener,
    shared: &Shared,
) -> Result<(), HaError> {
    let (lost_tx, mut lost_rx) = watch::channel(None::<String>);
    *shared.keepalive.lock().unwrap() =
        Some(tokio::spawn(keep_alive(shared.client.clone(), won.lease, ha.lease_ttl, won.granted_at, lost_tx)));
    let follower = shared.follower.lock().unwrap().take();
    if let Some(f) = follower {
        f.stop().await;
    }
    tracing::info!("elected leader (lease {:x}); loading the state from etcd", won.lease);
    let fence = Fence { key: ha.etcd.leader_key(), create_revision: won.create_revision };
    let etcd = ha.etcd.clone();
    let store = tokio::task::spawn_blocking(move || EtcdStore::connect(&etcd, Some(fence)))
        .await
        .map_err(|e| HaError::LostLeadership(format!("opening the state: {e}")))??;
    let mut fenced = store.fenced();
    let listen_err = |source| HaError::Listen { addr: config.listen, source };
    let listener = tokio::net::TcpListener::from_std(listener.try_clone().map_err(listen_err)?).map_err(listen_err)?;
    let handle = crate::serve(config, Arc::new(store), listener)
        .await
        .map_err(|e| HaError::LostLeadership(format!("cannot serve as leader: {e:#}")))?;
    *shared.cluster.lock().unwrap() = Some(handle.cluster.clone());
    *shared.leader.lock().await = Some(handle);
    shared.role.send_replace(Role::Leader);
    tracing::info!("leading: serving the API and scheduling");
    let why = tokio::select! {
        lost = lost_rx.wait_for(Option::is_some) => match lost {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the lease keeper stopped".to_string(),
        },
        refused = fenced.wait_for(|f| *f) => match refused {
            Ok(_) => "a state write was refused: another coordinator holds the leader key".to_string(),
            Err(_) => "the etcd state store stopped".to_string(),
        },
    };
    tracing::error!("stepping down: {why}");
    Err(HaError::LostLeadership(why))
}

/// Campaigns until this coordinator wins, publishing the current leader to the follower server meanwhile.
async fn campaign(shared: &Shared, ha: &HaConfig, advertise_url: &str) -> Leadership {
    let mut client = shared.client.clone();
    loop {
        match try_campaign(&mut client, shared, ha, advertise_url).await {
            Ok(Ok(won)) => return won,
            Ok(Err(holder)) => {
                // Our own URL as the holder: a previous run of this coordinator, whose lease has not expired.
                let leader = (holder != advertise_url && !holder.is_empty()).then_some(holder);
                shared.role.send_if_modified(|r| {
                    let new = Role::Follower { leader: leader.clone() };
                    let changed = *r != new;
                    if changed {
                        tracing::info!("following; leader: {}", leader.as_deref().unwrap_or("(its lease has not expired yet)"));
                    }
                    *r = new;
                    changed
                });
            }
            Err(e) => tracing::warn!("election: etcd: {e}"),
        }
        tokio::time::sleep(ha.poll).await;
    }
}

/// One round: `Ok(Ok(_))` won, `Ok(Err(url))` someone else leads.
async fn try_campaign(
    client: &mut Client,
    shared: &Shared,
    ha: &HaConfig,
    advertise_url: &str,
) -> Result<Result<Leadership, String>, etcd_client::Error> {
    let key = ha.etcd.leader_key();
    let current = client.get(key.clone(), None).await?;
    if let Some(kv) = current.kvs().first() {
        return Ok(Err(String::from_utf8_lossy(kv.value()).into_owned()));
    }
    let granted_at = Instant::now();
    let lease = client.lease_grant(ha.lease_ttl.as_secs() as i64, None).await?.id();
    *shared.lease.lock().unwrap() = Some(lease);
    let txn = Txn::new()
        .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then(vec![TxnOp::put(key.clone(), advertise_url, Some(PutOptions::new().with_lease(lease)))])
        .or_else(vec![TxnOp::get(key.clone(), None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        let create_revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        return Ok(Ok(Leadership { lease, create_revision, granted_at }));
    }
    shared.lease.lock().unwrap().take();
    let _ = client.lease_revoke(lease).await;
    let holder = resp
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        })
        .unwrap_or_default();
    Ok(Err(holder))
}

/// Renews the lease every TTL/4 until it cannot be confirmed for a whole TTL (or etcd says it expired);
/// then reports why on `lost`.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, granted_at: Instant, lost: watch::Sender<Option<String>>) {
    let every = ttl / 4;
    // Conservative: the lease runs at least from when the request that (re)started it was sent.
    let mut valid_until = granted_at + ttl;
    let mut stream = None;
    loop {
        let sent = Instant::now();
        if sent >= valid_until {
            let _ = lost.send(Some(format!("the leader lease could not be renewed for {ttl:?} (etcd unreachable?)")));
            return;
        }
        let renewed = tokio::time::timeout(every, async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(lease).await?);
            }
            let (keeper, responses) = stream.as_mut().expect("just set");
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => valid_until = sent + Duration::from_secs(resp.ttl() as u64),
            Ok(Ok(Some(_))) => {
                let _ = lost.send(Some("the leader lease expired".into()));
                return;
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".into(),
                    _ => "the keep-alive stream ended".into(),
                };
                tracing::warn!("renewing the leader lease: {why}");
                stream = None;
            }
        }
        tokio::time::sleep_until((sent + every).into()).await;
    }
}

/// The follower's gRPC server: redirects, health (`NOT_SERVING` for the qcluster services), reflection.
struct FollowerServer {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FollowerServer {
    async fn start(
        config: &CoordinatorConfig,
        listener: std::net::TcpListener,
        role: watch::Receiver<Role>,
    ) -> anyhow::Result<FollowerServer> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<CoordinatorServer<Api>>().await;
        health.set_not_serving::<WorkerControlServer<Api>>().await;
        health.set_not_serving::<RendezvousServer<Api>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(qcluster_proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(qcluster_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let server = crate::server_builder(&config.security)?
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(Redirect::<CoordinatorServer<Api>>::new(role.clone()))
            .add_service(Redirect::<WorkerControlServer<Api>>::new(role.clone()))
            .add_service(Redirect::<RendezvousServer<Api>>::new(role));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(tokio::net::TcpListener::from_std(listener)?);
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await
        });
        Ok(FollowerServer { shutdown, task })
    }

    async fn stop(mut self) {
        let _ = self.shutdown.send(());
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

/// Answers every call of service `S` with "not the leader" (see [`not_leader`]).
struct Redirect<S> {
    role: watch::Receiver<Role>,
    _service: PhantomData<fn() -> S>,
}

impl<S> Redirect<S> {
    fn new(role: watch::Receiver<Role>) -> Self {
        Redirect { role, _service: PhantomData }
    }
}

impl<S> Clone for Redirect<S> {
    fn clone(&self) -> Self {
        Redirect { role: self.role.clone(), _service: PhantomData }
    }
}

impl<S: NamedService> NamedService for Redirect<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for Redirect<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let status = not_leader(&self.role.borrow());
        std::future::ready(Ok(status.into_http()))
    }
}

/// `UNAVAILABLE` "not the leader…", with `x-qcluster-leader: URL` when the leader is known.
pub fn not_leader(role: &Role) -> tonic::Status {
    match role {
        Role::Follower { leader: Some(url) } => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Ok(v) = url.parse() {
                metadata.insert(LEADER_METADATA_KEY, v);
            }
            tonic::Status::with_metadata(
                tonic::Code::Unavailable,
                format!("{NOT_LEADER_PREFIX}: this coordinator is a follower; the leader is {url}"),
                metadata,
            )
        }
        Role::Follower { leader: None } => {
            tonic::Status::unavailable(format!("{NOT_LEADER_PREFIX}: no leader is elected yet; retry shortly"))
        }
        Role::Leader => tonic::Status::unavailable(format!("{NOT_LEADER_PREFIX} yet: this coordinator is taking over; retry")),
        Role::Stopped => tonic::Status::unavailable(format!("{NOT_LEADER_PREFIX}: this coordinator has stopped")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{test_etcd, wipe_etcd};
    use qcluster_proto::leader::leader_hint;
    use qcluster_proto::v1 as pb;
    use qcluster_proto::v1::coordinator_client::CoordinatorClient;

    const JOB: &str = "name: ha\nkind: comm-check\nresources: {nodes: 1, gpus_per_node: 0, ranks: 1}\ncomm_check: {bytes: 65536, iters: 3}\n";

    fn coordinator(dir: &tempfile::TempDir, etcd: &EtcdConfig, ttl_s: u64) -> (CoordinatorConfig, HaConfig) {
        let mut c = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_timeout = Duration::from_millis(1500);
        let mut ha = HaConfig::new(etcd.clone());
        ha.lease_ttl = Duration::from_secs(ttl_s);
        ha.poll = Duration::from_millis(100);
        (c, ha)
    }

    async fn wait_role(c: &HaCoordinator, want: &Role) {
        let mut role = c.role.clone();
        tokio::time::timeout(Duration::from_secs(10), role.wait_for(|r| r == want))
            .await
            .unwrap_or_else(|_| panic!("role stayed {:?}, expected {want:?}", c.role()))
            .unwrap();
    }

    async fn client(c: &HaCoordinator) -> CoordinatorClient<tonic::transport::Channel> {
        CoordinatorClient::connect(c.url()).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_followers_redirect_and_a_killed_leader_is_replaced_after_its_lease() {
        let Some(etcd) = test_etcd("ha-failover") else { return };
        let ttl = 3;
        let (dir_a, dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ca, ha_a) = coordinator(&dir_a, &etcd, ttl);
        let a = start(ca, ha_a).await.unwrap();
        assert!(a.wait_leader(Duration::from_secs(10)).await, "a lone coordinator leads");
        let (cb, ha_b) = coordinator(&dir_b, &etcd, ttl);
        let b = start(cb, ha_b).await.unwrap();
        wait_role(&b, &Role::Follower { leader: Some(a.advertise_url.clone()) }).await;

        // The follower redirects every call, naming the leader.
        let err = client(&b).await.list_jobs(pb::ListJobsRequest { states: vec![] }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert_eq!(leader_hint(&err).as_deref(), Some(a.advertise_url.as_str()), "{err:?}");
        assert!(err.message().starts_with(NOT_LEADER_PREFIX), "{}", err.message());

        // The leader serves; its state goes to etcd.
        let req = pb::SubmitJobRequest { spec_yaml: JOB.into(), source_name: "ha.yaml".into() };
        let id = client(&a).await.submit_job(req).await.unwrap().into_inner().job_id;

        // Killed without resigning: the follower waits out the lease, then leads with the same state.
        let killed = Instant::now();
        a.kill().await;
        assert!(b.wait_leader(Duration::from_secs(ttl + 10)).await, "the follower took over");
        let took = killed.elapsed();
        assert!(took >= Duration::from_millis(ttl * 1000 - 1000), "took over before the lease ran out: {took:?}");
        let job = client(&b).await.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(job.state, "Pending");
        assert!(job.events.iter().any(|e| e.text.contains("submitted from ha.yaml")), "{:?}", job.events);

        // A graceful stop resigns: the next follower takes over at once, not after the TTL.
        let (cc, ha_c) = coordinator(&dir_c, &etcd, ttl);
        let c = start(cc, ha_c).await.unwrap();
        wait_role(&c, &Role::Follower { leader: Some(b.advertise_url.clone()) }).await;
        let stopped = Instant::now();
        b.stop().await;
        assert!(c.wait_leader(Duration::from_secs(ttl + 10)).await);
        let took = stopped.elapsed();
        assert!(took < Duration::from_millis(ttl * 1000 - 500), "a resignation should not wait for the lease: {took:?}");
        assert_eq!(c.cluster().unwrap().job(&id).unwrap().events.len(), job.events.len());
        c.stop().await;
        wipe_etcd(&etcd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_lease_is_gone_steps_down_and_cannot_write() {
        let Some(etcd) = test_etcd("ha-stepdown") else { return };
        let dir = tempfile::tempdir().unwrap();
        let (c, ha) = coordinator(&dir, &etcd, 3);
        let mut a = start(c, ha).await.unwrap();
        assert!(a.wait_leader(Duration::from_secs(10)).await);
        let cluster = a.cluster().unwrap();
        // Someone revokes the leader's lease (as etcd does when it expires): the key goes away.
        let mut etcd_client = etcd.client().await.unwrap();
        let key = etcd_client.get(etcd.leader_key(), None).await.unwrap();
        let lease = key.kvs()[0].lease();
        etcd_client.lease_revoke(lease).await.unwrap();
        // A write now is refused by the fence, whichever notices first (the write or the lease keeper).
        let write = cluster.submit(JOB, "late.yaml").await;
        assert!(write.is_err(), "a deposed leader must not write: {write:?}");
        let ended = tokio::time::timeout(Duration::from_secs(10), a.wait()).await.expect("steps down");
        assert!(matches!(ended, Err(HaError::LostLeadership(_))), "{ended:?}");
        assert_eq!(a.role(), Role::Stopped);
        let mut store = etcd_client.get(etcd.jobs_prefix(), Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
        assert!(store.take_kvs().is_empty(), "nothing was written after the lease was gone");
        a.kill().await;
        wipe_etcd(&etcd).await;
    }

    #[tokio::test]
    async fn redirect_status_carries_the_leader() {
        let s = not_leader(&Role::Follower { leader: Some("http://10.0.0.1:7070".into()) });
        assert_eq!(leader_hint(&s).as_deref(), Some("http://10.0.0.1:7070"));
        let s = not_leader(&Role::Follower { leader: None });
        assert_eq!((s.code(), leader_hint(&s)), (tonic::Code::Unavailable, None));
    }
}

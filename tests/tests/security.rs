//! Transport security end to end, with real TLS (rustls) and real certificates made for the test (rcgen): a
//! coordinator that requires mutual TLS and bearer tokens, a worker and its ranks that connect with them, and the
//! refusals — no token, a wrong token, a client that trusts another CA, a client without a certificate, and a
//! worker whose token was revoked from the token file.

use std::path::Path;
use std::time::Duration;

use qcluster_proto::client::ClientSecurity;
use qcluster_proto::v1 as pb;
use qcluster_proto::v1::coordinator_client::CoordinatorClient;
use qcluster_proto::v1::worker_control_client::WorkerControlClient;
use qcluster_tests::{TestCluster, comm_check_yaml, test_coordinator_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA and what it signed, as PEM files in `dir`.
struct Pki {
    ca: std::path::PathBuf,
}

fn make_ca(dir: &Path, name: &str) -> (Pki, CertifiedIssuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("qcluster test CA {name}"));
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&path, ca.pem()).unwrap();
    (Pki { ca: path }, ca)
}

/// A leaf certificate for `names` signed by `ca`: `(cert.pem, key.pem)` paths.
fn make_leaf(dir: &Path, ca: &CertifiedIssuer<'static, KeyPair>, name: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn security(token: Option<&str>, ca: &Path, client: Option<&(std::path::PathBuf, std::path::PathBuf)>) -> ClientSecurity {
    ClientSecurity::load(
        token.map(str::to_string),
        None,
        Some(ca),
        client.map(|c| c.0.as_path()),
        client.map(|c| c.1.as_path()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_admit_the_right_clients_and_refuse_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ca) = make_ca(dir.path(), "good");
    let (other, other_ca) = make_ca(dir.path(), "other");
    let server = make_leaf(dir.path(), &ca, "server", &["localhost", "127.0.0.1"]);
    let client_cert = make_leaf(dir.path(), &ca, "client", &["qctl"]);
    let rogue_cert = make_leaf(dir.path(), &other_ca, "rogue", &["qctl"]);
    let users = dir.path().join("users.tokens");
    let workers = dir.path().join("workers.tokens");
    std::fs::write(&users, "# users\nuser-secret\n").unwrap();
    std::fs::write(&workers, "worker-n1\nworker-n2\n").unwrap();

    let state = tempfile::tempdir().unwrap();
    let mut config = test_coordinator_config("127.0.0.1:0".parse().unwrap(), state.path().to_path_buf());
    config.security =
        qcoord::auth::ServerSecurity::load(Some(&server.0), Some(&server.1), Some(&pki.ca), Some(&users), Some(&workers))
            .unwrap();
    let coordinator = qcoord::start(config).await.unwrap();
    let url = format!("https://localhost:{}", coordinator.addr.port());

    // A user with the CA, a client certificate and the token is served.
    let user = security(Some("user-secret"), &pki.ca, Some(&client_cert));
    let mut client = CoordinatorClient::new(user.connect(&url).await.unwrap());
    client.list_jobs(pb::ListJobsRequest { states: vec![] }).await.unwrap();

    // No token, or a worker's token on the user API: refused.
    let mut anonymous = CoordinatorClient::new(security(None, &pki.ca, Some(&client_cert)).connect(&url).await.unwrap());
    let e = anonymous.list_jobs(pb::ListJobsRequest { states: vec![] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let mut wrong = CoordinatorClient::new(security(Some("nope"), &pki.ca, Some(&client_cert)).connect(&url).await.unwrap());
    assert_eq!(wrong.list_jobs(pb::ListJobsRequest { states: vec![] }).await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // A client trusting another CA does not complete the handshake; nor does one without a client certificate,
    // nor one whose certificate another CA signed.
    let e = security(Some("user-secret"), &other.ca, Some(&client_cert)).connect(&url).await;
    assert!(e.is_err(), "a client that trusts the wrong CA connected");
    for bad in [security(Some("user-secret"), &pki.ca, None), security(Some("user-secret"), &pki.ca, Some(&rogue_cert))] {
        let refused = match bad.connect(&url).await {
            Err(_) => true,
            Ok(ch) => CoordinatorClient::new(ch).list_jobs(pb::ListJobsRequest { states: vec![] }).await.is_err(),
        };
        assert!(refused, "mutual TLS let a client without a valid certificate in");
    }
    // Plain HTTP with certificates configured is refused before any connection.
    assert!(user.connect(&format!("http://127.0.0.1:{}", coordinator.addr.port())).await.is_err());

    // A worker with its token registers, and its ranks (which inherit the token and the TLS files) run a job.
    let work = tempfile::tempdir().unwrap();
    let mut wc = qworker::WorkerConfig::new(url.clone(), "n1", work.path().join("n1"));
    wc.gpus = qworker::GpuSetting::Count(0);
    wc.cpu_slots = 2;
    wc.rank_command = vec![TestCluster::rank_program()];
    wc.security = security(Some("worker-n1"), &pki.ca, Some(&client_cert));
    let worker = qworker::start(wc).unwrap();
    let alive = |n: usize| {
        let mut c = client.clone();
        async move {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            nodes.iter().filter(|n| n.alive).count() == n
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !alive(1).await {
        assert!(std::time::Instant::now() < deadline, "the worker did not register over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let yaml = comm_check_yaml("tls-check", 2, 1, "");
    let id = client
        .submit_job(pb::SubmitJobRequest { spec_yaml: yaml, source_name: "tls.yaml".into() })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = client.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        if s.state == "Succeeded" {
            break;
        }
        assert!(s.state != "Failed" && std::time::Instant::now() < deadline, "{s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Revoke n2's token: a worker presenting it cannot register. (n1 keeps its token and stays alive.)
    let n2 = security(Some("worker-n2"), &pki.ca, Some(&client_cert));
    let register = |sec: ClientSecurity| {
        let url = url.clone();
        async move {
            let mut w = WorkerControlClient::new(sec.connect(&url).await.unwrap());
            w.register(pb::RegisterRequest { node_name: "n2".into(), ..Default::default() }).await
        }
    };
    std::fs::write(&workers, "worker-n1\n").unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options().write(true).open(&workers).unwrap().set_modified(later).unwrap();
    let e = register(n2).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("revoked"), "{e}");

    worker.shutdown(Duration::from_secs(5)).await;
    coordinator.stop().await;
}

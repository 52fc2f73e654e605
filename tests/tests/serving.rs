//! Serving through the cluster: a `kind: serve` job reports its OpenAI endpoint in the job status and answers
//! on it until cancelled; a training job with `serve_after_training` serves its final checkpoint.

use std::net::SocketAddr;
use std::time::Duration;

use qcluster_proto::v1 as pb;
use qcluster_tests::TestCluster;
use qworker::launch::process_alive;

const T: Duration = Duration::from_secs(120);

fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// `http://HOST:PORT/v1` → the socket address.
fn endpoint_addr(endpoint: &str) -> SocketAddr {
    endpoint.trim_start_matches("http://").trim_end_matches("/v1").parse().unwrap()
}

async fn get(addr: SocketAddr, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || qcluster_tests::http_get(addr, path)).await.unwrap().unwrap()
}

/// Waits for the endpoint result, checks `/v1/models` and `/health`, cancels, and checks the rank is gone.
async fn check_served_then_cancel(c: &TestCluster, id: &str, model_id: &str) {
    let s = c.wait_job(id, T, |s| s.results.contains_key("endpoint") || s.state == "Failed").await.unwrap();
    assert_eq!(s.state, "Running", "{s:#?}\n{}", c.logs(id).await.unwrap());
    let addr = endpoint_addr(&s.results["endpoint"]);
    let models = get(addr, "/v1/models").await;
    assert!(models.contains(model_id), "{models}");
    let pids = c.recorded_pids(id);
    assert_eq!(pids.len(), 1);
    let r = c.client().await.unwrap().cancel_job(pb::CancelJobRequest { job_id: id.to_string() }).await.unwrap();
    assert_eq!(r.into_inner().state, "Cancelled");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while process_alive(pids[0]) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!process_alive(pids[0]), "the inference worker survived the cancel");
    assert!(std::net::TcpStream::connect(addr).is_err(), "the endpoint still answers after the cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_job_reports_its_endpoint_and_stops_on_cancel() {
    let c = TestCluster::start(1, 2).await.unwrap();
    let yaml = format!(
        "name: tiny-serve\nkind: serve\nresources: {{ranks: 1}}\nserve: {{model: {}, port: 0, served_model_name: tiny}}\n",
        repo("configs/models/qwen3-tiny-chat")
    );
    let id = c.submit(&yaml).await.unwrap();
    check_served_then_cancel(&c, &id, "\"tiny\"").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_job_serves_its_final_checkpoint() {
    let c = TestCluster::start(1, 2).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: pt-serve\nkind: pretrain\nresources: {{ranks: 1}}\nmodel: {}\ndataset: {}\noutput_dir: {}\n\
max_length: 32\nmicro_batch_size: 2\ntrain_iters: 3\nserve_after_training: true\nserve: {{port: 0}}\n",
        repo("configs/models/qwen3-tiny-chat"),
        repo("configs/data/quickstart.jsonl"),
        out.path().display()
    );
    let id = c.submit(&yaml).await.unwrap();
    let s = c.wait_job(&id, T, |s| s.results.contains_key("endpoint") || s.state == "Failed").await.unwrap();
    let checkpoint = out.path().join("checkpoint-3");
    assert_eq!(s.results.get("served_model").map(String::as_str), Some(checkpoint.display().to_string().as_str()), "{s:#?}");
    assert_eq!(s.results["final_step"], "3");
    check_served_then_cancel(&c, &id, "checkpoint-3").await;
    c.shutdown().await;
}

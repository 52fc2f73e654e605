//! A stock gRPC client (Python grpcio with health and reflection, no qcluster code) against a running
//! coordinator. `.ci/run` installs the Python packages; without them this test says it skipped.

use qcluster_tests::{TestCluster, comm_check_yaml};
use std::time::Duration;

fn python_grpc_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.proto_reflection_descriptor_database"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_uses_health_reflection_and_dynamic_calls() {
    if !python_grpc_available() {
        println!("SKIPPED: python3 with grpcio, grpcio-health-checking and grpcio-reflection is not installed");
        return;
    }
    let c = TestCluster::start(1, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, comm_check_yaml("stock", 2, 1, "")).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/stock_grpc_client.py");
    let addr = c.url().trim_start_matches("http://").to_string();
    let out = tokio::process::Command::new("python3").arg(script).arg(&addr).arg(&job).output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("health qcluster.v1.Coordinator: SERVING"), "{text}");
    assert!(text.contains("unknown job: NOT_FOUND"), "{text}");
    let id = text.lines().find_map(|l| l.strip_prefix("dynamic call: submitted ")).unwrap().split(',').next().unwrap();
    c.wait_state(id, "Succeeded", Duration::from_secs(60)).await.unwrap();
    c.shutdown().await;
}

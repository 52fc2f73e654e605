//! The gRPC edge: the Coordinator, WorkerControl and Rendezvous services over a [`Cluster`].
//! Converts wire requests into cluster calls and [`ClusterError`]s into gRPC statuses.

use crate::cluster::{Cluster, ClusterError};
use crate::domain::JobState;
use crate::logs::{LogFileId, LogStore};
use qcluster_proto::v1 as pb;
use qcluster_proto::v1::coordinator_server::Coordinator;
use qcluster_proto::v1::rendezvous_server::Rendezvous;
use qcluster_proto::v1::worker_control_server::WorkerControl;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        match e {
            ClusterError::InvalidSpec(m) => Status::invalid_argument(m),
            ClusterError::UnknownJob(_) => Status::not_found(e.to_string()),
            ClusterError::UnknownSession(_) => Status::failed_precondition(e.to_string()),
            ClusterError::Store(_) | ClusterError::ShuttingDown => Status::unavailable(e.to_string()),
        }
    }
}

/// Shared by the three services.
#[derive(Clone)]
pub struct Api {
    pub cluster: Arc<Cluster>,
    pub logs: LogStore,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Largest log chunk sent in one message.
const LOG_CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl Coordinator for Api {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = req.into_inner();
        let source = if req.source_name.is_empty() { "<request>" } else { req.source_name.as_str() };
        let job_id = self.cluster.submit(&req.spec_yaml, source).await?;
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(self.cluster.job(&req.into_inner().job_id)?.to_proto()))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.cluster.jobs(&req.into_inner().states).iter().map(|j| j.to_proto()).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let state = self.cluster.cancel(&req.into_inner().job_id).await?;
        Ok(Response::new(pb::CancelJobResponse { state: state.as_str().to_string() }))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        Ok(Response::new(pb::ListNodesResponse { nodes: self.cluster.nodes() }))
    }

    type StreamLogsStream = BoxStream<pb::LogChunk>;

    async fn stream_logs(&self, req: Request<pb::StreamLogsRequest>) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = req.into_inner();
        self.cluster.job(&req.job_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            let mut offsets: HashMap<LogFileId, u64> = HashMap::new();
            loop {
                // Read the job state before the files, so a final pass after the job ended sees all bytes.
                let ended = api.cluster.job(&req.job_id).map(|j| j.state.is_terminal()).unwrap_or(true);
                let files = api.logs.files(&req.job_id);
                for id in files {
                    if req.rank.is_some_and(|r| r != id.rank) || req.attempt.is_some_and(|a| a != id.attempt) {
                        continue;
                    }
                    loop {
                        let offset = offsets.get(&id).copied().unwrap_or(0);
                        let data = match api.logs.read_from(&req.job_id, &id, offset, LOG_CHUNK) {
                            Ok(d) => d,
                            Err(e) => {
                                let _ = tx.send(Err(Status::internal(format!("reading logs: {e}")))).await;
                                return;
                            }
                        };
                        if data.is_empty() {
                            break;
                        }
                        offsets.insert(id.clone(), offset + data.len() as u64);
                        let chunk =
                            pb::LogChunk { attempt: id.attempt, rank: id.rank, stream: id.stream.clone(), data };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                }
                if !req.follow || ended || api.cluster.is_closed() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl WorkerControl for Api {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        if req.node_name.is_empty() || req.node_name.len() > 128 {
            return Err(Status::invalid_argument("node_name must be 1-128 characters"));
        }
        tracing::info!(node = %req.node_name, gpus = req.gpus, cpu_slots = req.cpu_slots, "worker registered");
        Ok(Response::new(self.cluster.register(req).await?))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(pb::HeartbeatResponse { known: self.cluster.heartbeat(&req.node_name, &req.session_id) }))
    }

    type AssignmentsStream = BoxStream<pb::Assignment>;

    async fn assignments(&self, req: Request<pb::AssignmentsRequest>) -> Result<Response<Self::AssignmentsStream>, Status> {
        let req = req.into_inner();
        let rx = self.cluster.assignments(&req.node_name, &req.session_id)?;
        let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_rank(&self, req: Request<pb::RankReport>) -> Result<Response<pb::Ack>, Status> {
        self.cluster.rank_report(req.into_inner()).await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn ship_logs(&self, req: Request<pb::LogBatch>) -> Result<Response<pb::Ack>, Status> {
        let b = req.into_inner();
        self.cluster.job(&b.job_id)?;
        let id = LogFileId { attempt: b.attempt, rank: b.rank, stream: b.stream };
        self.logs.append(&b.job_id, &id, &b.data).map_err(|e| Status::invalid_argument(format!("log batch: {e}")))?;
        Ok(Response::new(pb::Ack {}))
    }
}

fn timeout_of(ms: u64) -> Duration {
    Duration::from_millis(if ms == 0 { 300_000 } else { ms.min(3_600_000) })
}

#[tonic::async_trait]
impl Rendezvous for Api {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let r = req.into_inner();
        let world = self.cluster.attempt_world(&r.job_id, r.attempt)?;
        if world != r.world_size {
            return Err(Status::invalid_argument(format!("world size {} but the job has {world}", r.world_size)));
        }
        let addresses = self
            .cluster
            .rendezvous
            .join(&r.job_id, r.attempt, r.rank, r.world_size, r.address, timeout_of(r.timeout_ms))
            .await
            .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        Ok(Response::new(pb::JoinResponse { addresses }))
    }

    async fn put(&self, req: Request<pb::KvPut>) -> Result<Response<pb::Ack>, Status> {
        let r = req.into_inner();
        self.cluster.attempt_world(&r.job_id, r.attempt)?;
        self.cluster.rendezvous.put(&r.job_id, r.attempt, r.key, r.value);
        Ok(Response::new(pb::Ack {}))
    }

    async fn get(&self, req: Request<pb::KvGet>) -> Result<Response<pb::KvValue>, Status> {
        let r = req.into_inner();
        self.cluster.attempt_world(&r.job_id, r.attempt)?;
        let value = self
            .cluster
            .rendezvous
            .get(&r.job_id, r.attempt, &r.key, timeout_of(r.timeout_ms))
            .await
            .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        Ok(Response::new(pb::KvValue { value }))
    }

    async fn report_progress(&self, req: Request<pb::ProgressReport>) -> Result<Response<pb::Ack>, Status> {
        self.cluster.progress(req.into_inner()).await?;
        Ok(Response::new(pb::Ack {}))
    }
}

/// Whether a job state name is terminal (for clients that only have the string).
pub fn is_terminal_state(state: &str) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled].iter().any(|s| s.as_str() == state)
}

"""A stock gRPC client (Python grpcio, no qcluster code) against a running coordinator.

Usage: stock_grpc_client.py HOST:PORT JOB_YAML_PATH

Checks, printing one line each and exiting non-zero on the first failure:
- the standard health service answers SERVING for the server and for qcluster.v1.Coordinator;
- server reflection lists the qcluster services and yields their descriptors;
- with only those reflected descriptors, SubmitJob and GetJob can be called (dynamic messages).
"""
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main() -> None:
    target, job_path = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "qcluster.v1.Coordinator"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)
        print(f"health {service or '<server>'}: SERVING")

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    for wanted in ["qcluster.v1.Coordinator", "qcluster.v1.WorkerControl", "qcluster.v1.Rendezvous"]:
        assert wanted in services, (wanted, services)
    print("reflection services:", ", ".join(sorted(s for s in services if s.startswith("qcluster"))))

    pool = descriptor_pool.DescriptorPool(db)
    coordinator = pool.FindServiceByName("qcluster.v1.Coordinator")

    def call(method_name, **fields):
        method = coordinator.methods_by_name[method_name]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/qcluster.v1.Coordinator/{method_name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return rpc(request_cls(**fields), timeout=30)

    with open(job_path) as f:
        job_id = call("SubmitJob", spec_yaml=f.read(), source_name=job_path).job_id
    status = call("GetJob", job_id=job_id)
    assert status.job_id == job_id and status.kind == "comm-check", status
    print(f"dynamic call: submitted {job_id}, state {status.state}")

    try:
        call("GetJob", job_id="no-such-job")
        raise AssertionError("unknown job id accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print(f"unknown job: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()

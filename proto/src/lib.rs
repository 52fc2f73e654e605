//! The qcluster gRPC API, generated from `proto/qcluster/v1/qcluster.proto`.
//!
//! This crate holds the wire types and [`client`], the one place clients build their channels (TLS, bearer
//! token) and [`leader`] (which coordinator of several to call). Daemons convert to their own domain types at the edge
//! (`from_proto` / `to_proto` in the crate that owns the domain type); nothing outside this crate derives
//! prost.

pub mod client;
pub mod leader;

pub mod v1 {
    tonic::include_proto!("qcluster.v1");
}

/// Encoded `FileDescriptorSet` of the API, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qcluster_descriptor.bin"));

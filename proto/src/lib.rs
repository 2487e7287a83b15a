//! The pxemesh wire contract: generated types and gRPC services of package
//! `pxemesh.v1`. These types stay at the gRPC edge; daemons convert them to their
//! own domain types.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("pxemesh.v1");
}

/// Encoded `FileDescriptorSet` for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pxemesh_descriptor");

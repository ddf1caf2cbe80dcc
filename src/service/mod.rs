//! Protocol adapters: the gRPC rate limit service, health and reflection.

pub mod grpc;

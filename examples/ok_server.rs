//! The ceiling for bench/load.sh: a bare tonic `RateLimitService` that answers OK to every
//! descriptor without matching or counting anything.
//!
//!     cargo run --release --example ok_server -- --grpc-addr 127.0.0.1:18091
//!
//! It is served the way `meshlimit serve` serves its gRPC port (tonic's routes on
//! meshlimit's own connection serving, `meshlimit::connections`; tokio multi-thread
//! runtime, TCP_NODELAY, allocator), so the gap between the two in the load test is the
//! cost of meshlimit's own work: matching, counting and the fuller answer.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use meshlimit::connections::{Lifetime, Server};
use meshlimit::proto::rate_limit_response::{Code, DescriptorStatus};
use meshlimit::proto::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use meshlimit::proto::{RateLimitRequest, RateLimitResponse};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The allocator `meshlimit serve` uses: the ceiling is the same stack, allocator included.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "A RateLimitService that answers OK to everything: the load test's ceiling")]
struct Args {
    /// Where the gRPC service listens.
    #[arg(long, default_value = "127.0.0.1:18091")]
    grpc_addr: SocketAddr,
}

struct AlwaysOk;

#[tonic::async_trait]
impl RateLimitService for AlwaysOk {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        // Envoy expects one status per descriptor, in order; answering fewer would make
        // this ceiling cheaper than any correct server could be.
        let status = DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![status; request.get_ref().descriptors.len()],
            ..Default::default()
        }))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match TcpListener::bind(args.grpc_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("ok_server: cannot listen on {}: {error}", args.grpc_addr);
            return ExitCode::FAILURE;
        }
    };
    eprintln!("ok_server: listening on {}", args.grpc_addr);
    let server = Server {
        routes: tonic::service::Routes::new(RateLimitServiceServer::new(AlwaysOk)).prepare(),
        lifetime: Lifetime::default(),
        counts: Default::default(),
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // Served until killed, as the load test stops it.
    server.serve(incoming, std::future::pending()).await;
    ExitCode::SUCCESS
}

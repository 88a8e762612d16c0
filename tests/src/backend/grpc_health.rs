//! grpc.health.v1 server whose answer follows the shared [`Faults`].

use std::pin::Pin;

use futures_util::Stream;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::faults::{Fault, Faults};

/// Serves `grpc.health.v1.Health/Check` and `/Watch` on `listener` until the
/// future is dropped. Every service name (including `""`) is `SERVING`,
/// `NOT_SERVING` under [`Fault::Unhealthy`]; under [`Fault::Hang`] Check
/// waits (the client's deadline fires) and Watch sends nothing.
pub async fn serve_grpc_health(
    listener: TcpListener,
    faults: Faults,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(HealthServer::new(FaultHealth { faults }))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
}

struct FaultHealth {
    faults: Faults,
}

fn status_of(fault: Fault) -> ServingStatus {
    match fault {
        Fault::Unhealthy => ServingStatus::NotServing,
        _ => ServingStatus::Serving,
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for FaultHealth {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.faults.wait_while_hang().await;
        Ok(Response::new(response(status_of(self.faults.get()))))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let rx = self.faults.subscribe();
        // State: the receiver and the last status sent; emit only on a change.
        let stream = futures_util::stream::unfold((rx, None), |(mut rx, last)| async move {
            loop {
                let fault = *rx.borrow_and_update();
                if fault != Fault::Hang {
                    let status = status_of(fault);
                    if last != Some(status) {
                        return Some((Ok(response(status)), (rx, Some(status))));
                    }
                }
                // The sender outlives the server; an error means it is going away.
                rx.changed().await.ok()?;
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

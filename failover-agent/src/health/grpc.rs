//! gRPC health probe (grpc.health.v1 `Check`): healthy only on `SERVING`.
//! The channel is HTTP/2 and kept open, so a probe is one stream on an
//! existing connection; tonic reconnects by itself after a failure.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::http::connector;
use super::tls::TlsOptions;
use super::{BackendTarget, Probe, ProbeError, ProbeOutcome};

#[derive(Debug, Clone)]
pub struct GrpcProbe {
    client: HealthClient<Channel>,
    service: String,
}

impl GrpcProbe {
    /// `service` empty asks about the server as a whole. Must be called
    /// inside a tokio runtime (the channel's worker task is spawned here).
    pub fn new(
        target: &BackendTarget,
        service: &str,
        tls: Option<&TlsOptions>,
        timeout: Duration,
    ) -> Result<Self, ProbeError> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = format!("{scheme}://{}", target.addr);
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|source| ProbeError::Grpc { uri, source })?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        let channel = if tls.is_some() {
            // TLS through the same rustls connector as the HTTP probes, with
            // ALPN h2 (tonic's own TLS would be a second setup to keep in step).
            endpoint.connect_with_connector_lazy(connector(tls, timeout, true)?)
        } else {
            endpoint.connect_lazy()
        };
        Ok(Self {
            client: HealthClient::new(channel),
            service: service.to_owned(),
        })
    }
}

impl Probe for GrpcProbe {
    async fn check(&self) -> ProbeOutcome {
        let start = Instant::now();
        // Clients are cheap handles onto the shared channel.
        let mut client = self.client.clone();
        let req = HealthCheckRequest {
            service: self.service.clone(),
        };
        match client.check(req).await {
            Ok(resp) => match resp.into_inner().status() {
                ServingStatus::Serving => ProbeOutcome::Healthy {
                    latency: start.elapsed(),
                },
                other => ProbeOutcome::failed(format!("grpc health: {}", other.as_str_name())),
            },
            Err(status) => ProbeOutcome::failed(format!(
                "grpc health: {:?}: {}",
                status.code(),
                status.message()
            )),
        }
    }
}

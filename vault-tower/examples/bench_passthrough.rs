//! The load harness's floor for this stack (`bench/run.sh`, row
//! `passthrough`): vaultgate's own server loop and upstream connection pool
//! with no `VaultLayer` in between. Each request's target is rewritten to the
//! upstream and its `Authorization` replaced by `Bearer $BENCH_PROVIDER_KEY`
//! — no key lookup, policy, budget, body inspection or metering.
//!
//! The gap between this row and nginx is what hyper and tokio cost; the gap
//! between `vaultgate` and this row is what the layer costs.
//!
//! ```sh
//! BENCH_PROVIDER_KEY=sk-bench-... cargo run --release -p vault-tower \
//!     --example bench_passthrough -- 127.0.0.1:9103 127.0.0.1:9100
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use http::header::{AUTHORIZATION, HeaderValue};
use http::{Request, Uri};
use tower::ServiceBuilder;
use vault_tower::{Forwarder, Timeouts};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: bench_passthrough LISTEN_ADDR UPSTREAM_ADDR".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let mut bearer =
        HeaderValue::try_from(format!("Bearer {}", std::env::var("BENCH_PROVIDER_KEY")?))?;
    bearer.set_sensitive(true);
    let forwarder = Forwarder::new(Timeouts {
        connect: Duration::from_secs(5),
        response: Duration::from_secs(30),
        idle: Duration::from_secs(30),
    });
    let service = ServiceBuilder::new()
        .map_request(move |mut req: Request<axum::body::Body>| {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = format!("http://{upstream}{target}").parse::<Uri>() {
                *req.uri_mut() = uri;
            }
            req.headers_mut().insert(AUTHORIZATION, bearer.clone());
            req
        })
        .service(forwarder);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("bench_passthrough: listening on http://{listen}");
    let never = std::future::pending::<()>();
    vault_tower::server::serve(
        listener,
        Router::new().fallback_service(service),
        never,
        Duration::ZERO,
    )
    .await?;
    Ok(())
}

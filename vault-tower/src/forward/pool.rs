//! Upstream HTTP/1.1 connections that the request using them drives itself.
//!
//! A pooled client that runs each connection as its own task hands every
//! request, response head and body chunk from one task to another: a
//! wake-up per hand-over (across threads, a futex call and a context
//! switch), and, since hyper's body channel holds one chunk, one write to
//! the client per upstream chunk. Here a connection belongs to one call at a
//! time and is polled by that call's task: [`ConnPool::send`] polls it until
//! the response head arrives, and [`Exchange`] keeps polling it while the
//! body is read, so every chunk the connection has decoded by then goes out
//! in one frame (one client write for a burst of SSE events). When the body
//! ends cleanly, the connection goes back to the pool for the next call to
//! the same origin; a body that is dropped early takes its connection with
//! it (the provider sees the close, as it would from the client).
//!
//! Idle connections are not polled. A connection the provider closed while
//! idle is noticed when it is taken out (its close is read then), and a
//! request it could not send is retried once on a fresh connection: hyper
//! hands back a request it has not written, so a retry never sends twice.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::BoxError;

/// The request body type on upstream connections.
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, BoxError>;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Most idle connections kept per origin.
const MAX_IDLE_PER_ORIGIN: usize = 256;
/// Idle connections older than this are closed, not reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most bytes of already-decoded chunks joined into one frame.
const MAX_JOINED_FRAME: usize = 64 * 1024;

/// One upstream connection, owned by one call at a time. Always boxed
/// ([`Pooled`]): with its buffers and TLS state it is kilobytes, and it moves
/// between the pool, the request future and the response body.
struct Conn {
    send: SendRequest<ReqBody>,
    conn: Connection<Io, ReqBody>,
}

impl Conn {
    /// Lets the connection read, decode and write what it can without
    /// waiting. `false` once it has ended (closed or failed).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(&mut self.conn).poll(cx).is_pending()
    }
}

type Pooled = Box<Conn>;

/// A pooled connection; each origin's list is ordered oldest first.
struct Idle {
    conn: Pooled,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made; nothing was sent.
    Connect(BoxError),
    /// The request may have reached the upstream before this failure.
    Exchange(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Exchange(e) => write!(f, "{e}"),
        }
    }
}

/// Idle upstream connections by origin, and the connector for new ones.
/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub(crate) struct ConnPool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    idle: Mutex<HashMap<Origin, Vec<Idle>>>,
}

impl ConnPool {
    /// An empty pool; connections use TLS (rustls, `ring`, webpki roots)
    /// for `https` and plain TCP for `http`, both with `TCP_NODELAY`.
    pub(crate) fn new() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let connector = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
        {
            Ok(b) => b,
            // The ring provider always supports the safe default versions;
            // fall back to the process default provider if that ever changes.
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots(),
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
        ConnPool {
            shared: Arc::new(Shared {
                connector,
                idle: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sends `req` (absolute URI) over an idle connection to its origin or a
    /// new one made within `connect_timeout`, and waits for the response
    /// head. The response body drives the connection from then on.
    pub(crate) async fn send(
        &self,
        req: Request<ReqBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Exchange>, SendError> {
        let origin = origin_of(req.uri());
        let uri = req.uri().clone();
        let mut req = to_origin_form(req);
        loop {
            let (mut conn, reused) = match self.checkout(&origin).await {
                Some(c) => (c, true),
                // Boxed: connecting holds the whole new stream across awaits.
                None => (Box::pin(self.connect(&uri, connect_timeout)).await?, false),
            };
            let mut response = std::pin::pin!(conn.send.try_send_request(req));
            let mut alive = true;
            let result = poll_fn(|cx| {
                if alive {
                    alive = conn.drive(cx);
                }
                response.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => {
                    let pool = self.clone();
                    return Ok(
                        resp.map(|body| Exchange::new(body, alive.then_some(conn), pool, origin))
                    );
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send again on a fresh connection.
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(SendError::Connect(Box::new(e.into_error()))),
                    None => return Err(SendError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection to `origin` that is still
    /// open and ready for a request.
    async fn checkout(&self, origin: &Origin) -> Option<Pooled> {
        loop {
            let idle = {
                let mut map = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
                map.get_mut(origin)?.pop()?
            };
            if idle.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            let mut conn = idle.conn;
            // One poll reads a close (or stray bytes) that arrived while idle.
            let ready = poll_fn(|cx| {
                Poll::Ready(
                    conn.drive(cx) && matches!(conn.send.poll_ready(cx), Poll::Ready(Ok(()))),
                )
            })
            .await;
            if ready {
                return Some(conn);
            }
        }
    }

    async fn connect(&self, uri: &Uri, timeout: Duration) -> Result<Pooled, SendError> {
        let mut connector = self.shared.connector.clone();
        let io = match tokio::time::timeout(timeout, connector.call(uri.clone())).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(SendError::Connect(e)),
            Err(_) => {
                return Err(SendError::Connect(
                    format!("no connection within {} s", timeout.as_secs_f32()).into(),
                ));
            }
        };
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        Ok(Box::new(Conn { send, conn }))
    }

    fn checkin(&self, origin: Origin, conn: Pooled) {
        if conn.send.is_closed() {
            return;
        }
        let mut map = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(origin).or_default();
        // Oldest first: close the expired ones (a connection the provider
        // closed lingers half-open until then) and, over the cap, the oldest.
        let expired = list.partition_point(|i| i.since.elapsed() > IDLE_TIMEOUT);
        let over = (list.len() - expired + 1).saturating_sub(MAX_IDLE_PER_ORIGIN);
        list.drain(..expired + over);
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// The pool's key for connections that may be shared: scheme and
/// authority as the URI has them (cheap clones, no formatting per call).
type Origin = (Option<Scheme>, Option<Authority>);

fn origin_of(uri: &Uri) -> Origin {
    (uri.scheme().cloned(), uri.authority().cloned())
}

/// Moves the absolute URI's authority into `Host` and leaves the path and
/// query as the request target, as HTTP/1.1 sends it to an origin server.
fn to_origin_form(mut req: Request<ReqBody>) -> Request<ReqBody> {
    let uri = req.uri().clone();
    if let Some(authority) = uri.authority()
        && !req.headers().contains_key(http::header::HOST)
    {
        let default_port = match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        };
        let host = if authority.port_u16() == Some(default_port) {
            authority.host()
        } else {
            authority.as_str()
        };
        if let Ok(v) = http::HeaderValue::from_str(host) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    let mut parts = uri.into_parts();
    parts.scheme = None;
    parts.authority = None;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(t) = Uri::from_parts(parts) {
        *req.uri_mut() = t;
    }
    req
}

/// An upstream response body that drives its own connection, joins the
/// chunks already decoded into one frame, and returns the connection to the
/// pool when it ends cleanly.
pub struct Exchange {
    body: Incoming,
    conn: Option<Pooled>,
    pool: ConnPool,
    origin: Origin,
    /// Data read but not yet returned: the first chunk as it came (no copy
    /// for a body of one chunk), later ones joined after it.
    first: Option<Bytes>,
    more: BytesMut,
    /// A trailers frame read behind data still to return.
    trailers: Option<Frame<Bytes>>,
    /// A failure read behind data still to return, and whether the data has
    /// had its chance to be flushed.
    failed: Option<(hyper::Error, bool)>,
    /// The upstream body has ended (the connection is pooled or dropped).
    ended: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    fn new(body: Incoming, conn: Option<Pooled>, pool: ConnPool, origin: Origin) -> Self {
        Exchange {
            body,
            conn,
            pool,
            origin,
            first: None,
            more: BytesMut::new(),
            trailers: None,
            failed: None,
            ended: false,
        }
    }

    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = self.conn.as_mut()
            && !c.drive(cx)
        {
            self.conn = None;
        }
    }

    fn held(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.more.len()
    }

    fn hold(&mut self, data: Bytes) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(data);
            return;
        }
        if let Some(first) = self.first.take() {
            self.more.extend_from_slice(&first);
        }
        self.more.extend_from_slice(&data);
    }

    /// The data held so far as one frame, if any.
    fn take_held(&mut self) -> Option<Frame<Bytes>> {
        if !self.more.is_empty() {
            return Some(Frame::data(self.more.split().freeze()));
        }
        self.first.take().map(Frame::data)
    }

    /// Pools the connection once the body has ended cleanly.
    fn finish(&mut self, cx: &mut Context<'_>) {
        self.ended = true;
        // Let the connection settle into idle first.
        self.drive(cx);
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(self.origin.clone(), conn);
        }
    }
}

impl Body for Exchange {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((e, flushed)) = this.failed.take() {
            if flushed {
                return Poll::Ready(Some(Err(e)));
            }
            // Yield once so the data read before the failure is flushed to
            // the client: hyper drops unflushed output when a body fails.
            this.failed = Some((e, true));
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(t)));
        }
        while !this.ended {
            this.drive(cx);
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.hold(data);
                        if this.held() >= MAX_JOINED_FRAME {
                            break;
                        }
                    }
                    Err(trailers) => {
                        this.trailers = Some(trailers);
                        break;
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.conn = None;
                    this.ended = true;
                    // Data read before the failure goes out first.
                    if let Some(data) = this.take_held() {
                        this.failed = Some((e, false));
                        return Poll::Ready(Some(Ok(data)));
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.finish(cx),
                Poll::Pending => {
                    if this.held() == 0 {
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        match this.take_held() {
            Some(data) => Poll::Ready(Some(Ok(data))),
            None => Poll::Ready(this.trailers.take().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not before the upstream body's end has been read: that read is
        // what returns the connection to the pool.
        self.ended && self.held() == 0 && self.trailers.is_none() && self.failed.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.ended {
            return http_body::SizeHint::with_exact(self.held() as u64);
        }
        let inner = self.body.size_hint();
        let held = self.held() as u64;
        let mut hint = http_body::SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint.set_lower(inner.lower().saturating_add(held));
        hint
    }
}

//! The accept loop: HTTP/1.1 (hyper) on each TCP connection, with the limits
//! that keep a network peer from holding the runner's sockets.
//!
//! A connection is in one of three phases, and each has its own clock:
//!
//! - **waiting** for a request: closed after `idle_timeout` with no byte
//!   received, or `header_read_timeout` after the first byte of a request
//!   head that is still not complete (a slow-header client);
//! - **handling** a request: no clock here; the handler's own bounds apply
//!   (the request timeout, the long poll's [`MAX_WAIT_SECONDS`]);
//! - **responding**: closed after `idle_timeout` without a byte moving (a
//!   client that stopped reading its response).
//!
//! At most `max_connections` are open. At the cap a new connection closes
//! the one that has waited longest for a request (as nginx reuses its idle
//! keep-alive connections), so idle sockets cannot lock out `/healthz` or an
//! enrollment; when every connection is handling or responding, new ones
//! wait in the listen backlog until one ends.
//!
//! Over TLS the clocks watch the socket's bytes (the encrypted records),
//! and the handshake must end within `header_read_timeout` of the accept,
//! so a client that handshakes slowly (or not at all) cannot hold a socket
//! longer than one that sends its request head slowly. After a TLS
//! handshake each request carries a [`ClientCert`] extension (the node its
//! client certificate names, if any) when the runner asks for client
//! certificates.
//!
//! [`MAX_WAIT_SECONDS`]: flotilla_model::protocol::MAX_WAIT_SECONDS

use crate::HttpLimits;
use crate::tls::{ClientCert, TlsState};
use axum::Router;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;

/// Of the file limit, at least this many descriptors (and at least a
/// quarter) are kept back from connections: for the store, policies, logs
/// and the artifact files that downloads hold open.
const RESERVED_FDS: usize = 64;

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// requests in progress finish (idle connections close at once). With
/// `tls`, every connection is TLS, with the configuration in force when it
/// was accepted.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<Arc<TlsState>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let table = Arc::new(Table::new(connection_cap(limits.max_connections)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Our own clocks below replace hyper's header timer: hyper starts it as
    // soon as a connection waits for a request, which would make the idle
    // timeout of a keep-alive connection the (short) header timeout.
    http.timer(TokioTimer::new()).header_read_timeout(None);
    let mut accept_errors = Throttle::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors: make one free before trying
                    // again. Other errors (a peer that reset before the
                    // accept) concern that peer only.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        table.evict_one();
                        if accept_errors.ready() {
                            tracing::warn!("accept: {e}: closing idle connections; raise LimitNOFILE or lower [http] max_connections");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            },
        };
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            p = table.admit() => p,
        };
        let conn = table.register();
        let io = Watched {
            io: stream,
            conn: conn.clone(),
        };
        let http = http.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let tls = tls
            .as_ref()
            .map(|t| (t.config(), t.files().client_ca.is_some()));
        tokio::spawn(async move {
            let _permit: OwnedSemaphorePermit = permit;
            let served = async {
                match tls {
                    None => {
                        let service = service(&conn, peer, router, None);
                        watcher
                            .watch(http.serve_connection(TokioIo::new(io), service))
                            .await
                            .map_err(|e| e.to_string())
                    }
                    Some((config, wants_cert)) => {
                        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(io);
                        let limit = Duration::from_secs(limits.header_read_timeout_seconds);
                        let stream = match tokio::time::timeout(limit, handshake).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
                            Err(_) => {
                                return Err(
                                    "the TLS handshake took longer than header_read_timeout".into(),
                                );
                            }
                        };
                        conn.ready();
                        let cert = wants_cert.then(|| ClientCert {
                            node: stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(crate::tls::cert_node)
                                .map(Arc::from),
                        });
                        let service = service(&conn, peer, router, cert);
                        watcher
                            .watch(http.serve_connection(TokioIo::new(stream), service))
                            .await
                            .map_err(|e| e.to_string())
                    }
                }
            };
            tokio::select! {
                r = served => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection: {e}");
                    }
                }
                why = conn.expired(&limits) => {
                    tracing::debug!(%peer, "closing the connection: {why}");
                }
            }
            conn.table.remove(conn.id);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The per-connection service: the router, with the peer's address (and
/// its client certificate's node, over TLS) on every request, and the
/// connection's phase kept in step with its requests.
fn service(
    conn: &Arc<Conn>,
    peer: std::net::SocketAddr,
    router: Router,
    cert: Option<ClientCert>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    let conn = conn.clone();
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(c) = &cert {
            req.extensions_mut().insert(c.clone());
        }
        let in_flight = InFlight::start(&conn);
        let handled = router.clone().oneshot(req);
        async move {
            let res = handled.await?;
            let in_flight = in_flight.handled();
            // The request is over when its body is written (or dropped).
            Ok::<_, std::convert::Infallible>(res.map(move |body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _ = &in_flight;
                    frame
                }))
            }))
        }
    })
}

/// `max_connections`, lowered to what the process's file limit allows, so
/// that the cap (and with it the eviction of idle connections) comes before
/// `accept` fails for want of descriptors.
fn connection_cap(configured: usize) -> usize {
    let nofile = file_limit();
    let cap = cap_for(configured, nofile);
    if let Some(nofile) = nofile
        && cap < configured
    {
        tracing::warn!(
            "serving at most {cap} connections, not max_connections = {configured}: the file limit is {nofile}; raise LimitNOFILE to {} or more",
            (configured * 4).div_ceil(3).max(configured + RESERVED_FDS)
        );
    }
    cap
}

fn cap_for(configured: usize, nofile: Option<usize>) -> usize {
    let configured = configured.max(1);
    match nofile {
        Some(n) => configured.min(n.saturating_sub(RESERVED_FDS.max(n / 4)).max(1)),
        None => configured,
    }
}

/// The soft `RLIMIT_NOFILE`, when there is one.
fn file_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY)
        .then(|| usize::try_from(r.rlim_cur).unwrap_or(usize::MAX))
}

/// Raises the soft file limit to the hard one (as Go programs do at start):
/// a runner needs a descriptor per connection, and the usual soft limit of
/// 1024 is far below a fleet's. Returns the limit now in force.
pub fn raise_file_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    (r.rlim_cur != libc::RLIM_INFINITY).then(|| usize::try_from(r.rlim_cur).unwrap_or(usize::MAX))
}

/// The open connections and the permits that cap them.
struct Table {
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    start: Instant,
}

impl Table {
    fn new(cap: usize) -> Table {
        Table {
            permits: Arc::new(Semaphore::new(cap)),
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit for one more connection: at once while under the cap;
    /// at the cap, after closing the connection that has waited longest for
    /// a request, or (none waiting) after one ends.
    async fn admit(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(p) = self.permits.clone().try_acquire_owned() {
                return p;
            }
            let evicted = self.evict_one();
            let recheck = Duration::from_millis(if evicted { 1000 } else { 50 });
            tokio::select! {
                p = self.permits.clone().acquire_owned() => {
                    return p.expect("the semaphore is never closed");
                }
                () = tokio::time::sleep(recheck) => {}
            }
        }
    }

    /// Asks the connection that has waited longest for a request to close;
    /// `false` when none is waiting.
    fn evict_one(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .values()
            .filter(|c| c.waiting() && !c.evicting.load(SeqCst))
            .min_by_key(|c| c.waiting_since.load(SeqCst));
        match oldest {
            Some(c) => {
                c.evicting.store(true, SeqCst);
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn register(self: &Arc<Self>) -> Arc<Conn> {
        let now = self.now();
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, SeqCst),
            table: self.clone(),
            waiting_since: AtomicU64::new(now),
            head_from: AtomicU64::new(0),
            last_io: AtomicU64::new(now),
            handling: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.lock().insert(conn.id, conn.clone());
        conn
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Milliseconds since the server started, from 1 (0 means "not yet").
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }
}

/// One connection's phase and clocks (see the module doc).
struct Conn {
    id: u64,
    table: Arc<Table>,
    /// When the connection last started waiting for a request.
    waiting_since: AtomicU64,
    /// When the first byte of the awaited request head came; 0: none yet.
    head_from: AtomicU64,
    /// When a byte last moved either way.
    last_io: AtomicU64,
    /// Requests whose handler runs.
    handling: AtomicUsize,
    /// Requests whose handler runs or whose response is being written.
    requests: AtomicUsize,
    evicting: AtomicBool,
    evict: Notify,
}

/// Why a connection was closed by us.
#[derive(Debug, Clone, Copy)]
enum Expired {
    Idle,
    SlowHead,
    Stalled,
    Evicted,
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expired::Idle => "idle for idle_timeout",
            Expired::SlowHead => "the request head took longer than header_read_timeout",
            Expired::Stalled => "the response stalled for idle_timeout",
            Expired::Evicted => "idle, and a new connection needed its place",
        })
    }
}

impl Conn {
    fn waiting(&self) -> bool {
        self.requests.load(SeqCst) == 0
    }

    /// When this connection is due to close, and why; `None` while a handler runs.
    fn deadline(&self, limits: &HttpLimits) -> Option<(u64, Expired)> {
        let idle = limits.idle_timeout_seconds * 1000;
        if self.handling.load(SeqCst) > 0 {
            None
        } else if !self.waiting() {
            Some((self.last_io.load(SeqCst) + idle, Expired::Stalled))
        } else {
            match self.head_from.load(SeqCst) {
                0 => Some((self.waiting_since.load(SeqCst) + idle, Expired::Idle)),
                first => Some((
                    first + limits.header_read_timeout_seconds * 1000,
                    Expired::SlowHead,
                )),
            }
        }
    }

    /// Resolves when the connection is to be closed.
    async fn expired(&self, limits: &HttpLimits) -> Expired {
        // A phase can change while we sleep (a head starts arriving, a
        // handler returns): wake at least this often to look again.
        let look = limits
            .header_read_timeout_seconds
            .min(limits.idle_timeout_seconds)
            .max(1)
            * 1000;
        loop {
            let now = self.table.now();
            let due = self.deadline(limits);
            if let Some((at, why)) = due
                && at <= now
            {
                return why;
            }
            let wake = due.map_or(now + look, |(at, _)| at.min(now + look));
            let sleep = tokio::time::sleep(Duration::from_millis(wake - now));
            tokio::select! {
                () = sleep => {}
                () = self.evict.notified() => {
                    if self.waiting() {
                        return Expired::Evicted;
                    }
                    self.evicting.store(false, SeqCst);
                }
            }
        }
    }

    /// A TLS handshake finished: the connection now waits for its first
    /// request, on the idle clock (the handshake's bytes were no request head).
    fn ready(&self) {
        let now = self.table.now();
        self.head_from.store(0, SeqCst);
        self.waiting_since.store(now, SeqCst);
    }

    fn moved(&self, read: bool) {
        let now = self.table.now();
        self.last_io.store(now, SeqCst);
        if read && self.waiting() && self.head_from.load(SeqCst) == 0 {
            self.head_from.store(now, SeqCst);
        }
    }
}

/// A request in progress on a connection: its handler, then its body.
struct InFlight {
    conn: Arc<Conn>,
    handling: bool,
}

impl InFlight {
    fn start(conn: &Arc<Conn>) -> InFlight {
        conn.requests.fetch_add(1, SeqCst);
        conn.handling.fetch_add(1, SeqCst);
        conn.head_from.store(0, SeqCst);
        InFlight {
            conn: conn.clone(),
            handling: true,
        }
    }

    /// The handler returned; the response is being written.
    fn handled(mut self) -> InFlight {
        self.conn.last_io.store(self.conn.table.now(), SeqCst);
        self.conn.handling.fetch_sub(1, SeqCst);
        self.handling = false;
        self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.handling {
            self.conn.handling.fetch_sub(1, SeqCst);
        }
        let now = self.conn.table.now();
        self.conn.waiting_since.store(now, SeqCst);
        self.conn.requests.fetch_sub(1, SeqCst);
    }
}

/// A socket that notes when bytes move, for the connection's clocks.
struct Watched {
    io: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.moved(true);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.moved(false);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.moved(false);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// At most one log line a second.
#[derive(Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::cap_for;

    #[test]
    fn the_cap_leaves_descriptors_for_files() {
        assert_eq!(cap_for(10_000, Some(256)), 192);
        assert_eq!(cap_for(10_000, Some(1024)), 768);
        assert_eq!(cap_for(10_000, Some(20_000)), 10_000);
        assert_eq!(cap_for(10_000, Some(10)), 1);
        assert_eq!(cap_for(500, None), 500);
        assert_eq!(cap_for(0, None), 1);
    }
}

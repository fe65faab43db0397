//! The host transport of one channel instance: it carries out adapter commands (WebSocket,
//! HTTP, timers) and turns what happens into events on the instance's queue.
//!
//! It belongs to the channel instance, not to an adapter generation: a reload hands the new
//! generation the same open sockets, so the chat server never sees a reconnect.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use switchboard_plugin_api::{Event, Header, OpenConnection, OpenResource, ResourceKind};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue},
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    Connector,
};

use crate::{
    metrics::TransportMetrics,
    tls::{self, ChannelTls},
};

mod stream;

pub use stream::StreamSpec;
use stream::{StreamLink, StreamOutgoing};

/// The largest HTTP response body handed to an adapter that sets no limit of its own.
const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;

/// The largest limit an adapter may set (a body is held in memory whole).
const CEILING_MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;

/// Frames an instance holds read but not yet handled (its queue, or parked while it has no
/// running adapter), at most: then its sockets stop reading instead of its memory growing.
const FRAMES_QUEUED_MAX: usize = 4096;

/// Frames written to a WebSocket before it is flushed, at most.
const WRITE_COALESCE: usize = 64;

enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
}

/// An HTTP request an adapter asked for (`HttpRequest` or `HttpCall`).
pub struct HttpRequest {
    pub request: u64,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    /// 0: the host default (8 MiB).
    pub max_response_bytes: u64,
    /// Answer with `HttpBytesResponse` instead of `HttpResponse`.
    pub bytes: bool,
}

struct Socket {
    url: String,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    task: JoinHandle<()>,
}

/// A TCP/TLS stream (ABI v1.2), held like a socket.
struct Stream {
    address: String,
    outgoing: mpsc::UnboundedSender<StreamOutgoing>,
    task: JoinHandle<()>,
}

pub struct Transport {
    events: mpsc::UnboundedSender<Event>,
    tls: ChannelTls,
    tls_log: TlsLog,
    sockets: HashMap<u64, Socket>,
    streams: HashMap<u64, Stream>,
    timers: HashMap<u64, JoinHandle<()>>,
    max_message_bytes: usize,
    /// Frames read and not yet handled by an adapter: sockets stop reading at the bound (the
    /// server then holds or drops the connection; a resume or catch-up brings the rest).
    frames: Arc<tokio::sync::Semaphore>,
    /// HTTP requests sent and not yet answered to the adapter, by id, with their URL (no query).
    http_in_flight: Arc<Mutex<BTreeMap<u64, String>>>,
    metrics: TransportMetrics,
    /// A WebSocket of this instance has opened before: the next one to open is a reconnect.
    opened_before: Arc<AtomicBool>,
}

impl Transport {
    pub fn new(
        channel: &str,
        events: mpsc::UnboundedSender<Event>,
        tls: ChannelTls,
        max_message_bytes: usize,
        metrics: TransportMetrics,
    ) -> Self {
        let tls_log = TlsLog::new(channel.into());
        Self {
            events,
            tls,
            tls_log,
            sockets: HashMap::new(),
            streams: HashMap::new(),
            timers: HashMap::new(),
            max_message_bytes,
            frames: Arc::new(tokio::sync::Semaphore::new(FRAMES_QUEUED_MAX)),
            http_in_flight: Arc::new(Mutex::new(BTreeMap::new())),
            metrics,
            opened_before: Arc::new(AtomicBool::new(false)),
        }
    }

    /// HTTP requests whose answer has not reached the instance's queue yet.
    pub fn http_in_flight(&self) -> usize {
        self.http_in_flight.lock().unwrap().len()
    }

    /// `count` frames were handled (or given up on): their sockets may read that many more.
    pub fn frames_handled(&self, count: usize) {
        if count > 0 {
            self.frames.add_permits(count);
        }
    }

    /// Trust other roots from now on (the instance's `ca_file` changed). Open sockets stay as
    /// they are; new connections and requests use the new roots.
    pub fn set_tls(&mut self, tls: ChannelTls) {
        self.tls = tls;
        self.tls_log = TlsLog::new(self.tls_log.channel.clone());
    }

    /// The sockets a new generation inherits.
    pub fn open_connections(&self) -> Vec<OpenConnection> {
        let mut open: Vec<OpenConnection> = self
            .sockets
            .iter()
            .filter(|(_, socket)| !socket.task.is_finished())
            .map(|(conn, socket)| OpenConnection { conn: *conn, url: socket.url.as_str().into() })
            .collect();
        open.sort_by_key(|c| c.conn);
        open
    }

    /// Everything a new generation inherits, of every kind (ABI v1.1 `HostApi::handed_over`).
    pub fn open_resources(&self) -> Vec<OpenResource> {
        let mut open: Vec<OpenResource> = self
            .open_connections()
            .into_iter()
            .map(|c| OpenResource { kind: ResourceKind::WEBSOCKET, id: c.conn, detail: c.url })
            .collect();
        open.extend(self.http_in_flight.lock().unwrap().iter().map(|(request, url)| OpenResource {
            kind: ResourceKind::HTTP_REQUEST,
            id: *request,
            detail: url.as_str().into(),
        }));
        let mut streams: Vec<(u64, String)> = self
            .streams
            .iter()
            .filter(|(_, stream)| !stream.task.is_finished())
            .map(|(conn, stream)| (*conn, stream.address.clone()))
            .collect();
        streams.sort_unstable();
        open.extend(streams.into_iter().map(|(id, address)| OpenResource {
            kind: ResourceKind::STREAM,
            id,
            detail: address.into(),
        }));
        let mut timers: Vec<u64> =
            self.timers.iter().filter(|(_, task)| !task.is_finished()).map(|(timer, _)| *timer).collect();
        timers.sort_unstable();
        open.extend(timers.into_iter().map(|id| OpenResource { kind: ResourceKind::TIMER, id, detail: "".into() }));
        open
    }

    /// Open a TCP/TLS stream under `spec.conn` (a connection of either kind under that id
    /// is dropped first: ids name one connection).
    pub fn stream_open(&mut self, spec: StreamSpec) {
        self.drop_connection(spec.conn);
        let (outgoing, rx) = mpsc::unbounded_channel();
        let link = StreamLink { tls: self.tls.ws.clone(), frames: self.frames.clone(), events: self.events.clone() };
        let (conn, address) = (spec.conn, spec.address());
        let task = tokio::spawn(stream::run_stream(spec, link, rx));
        self.streams.insert(conn, Stream { address, outgoing, task });
    }

    pub fn stream_send(&mut self, conn: u64, data: Vec<u8>) {
        match self.streams.get(&conn) {
            Some(stream) => {
                let _ = stream.outgoing.send(StreamOutgoing::Data(data));
            }
            None => tracing::debug!(conn, "adapter wrote to a stream that is not open; dropped"),
        }
    }

    pub fn stream_close(&mut self, conn: u64) {
        if let Some(stream) = self.streams.get(&conn) {
            let _ = stream.outgoing.send(StreamOutgoing::Close);
        }
    }

    /// Forget a stream whose `StreamClosed` the adapter has now seen.
    pub fn forget_stream(&mut self, conn: u64) {
        if self.streams.get(&conn).is_some_and(|s| s.task.is_finished()) {
            self.streams.remove(&conn);
        }
    }

    fn drop_connection(&mut self, conn: u64) {
        if let Some(old) = self.sockets.remove(&conn) {
            old.task.abort();
        }
        if let Some(old) = self.streams.remove(&conn) {
            old.task.abort();
        }
    }

    pub fn ws_open(&mut self, conn: u64, url: String, headers: Vec<(String, String)>) {
        self.drop_connection(conn);
        let (outgoing, rx) = mpsc::unbounded_channel();
        let connect = Connect {
            log: self.tls_log.clone(),
            tls: self.tls.ws.clone(),
            max_message_bytes: self.max_message_bytes,
            frames: self.frames.clone(),
            metrics: self.metrics.clone(),
            opened_before: self.opened_before.clone(),
        };
        let task = tokio::spawn(run_socket(conn, url.clone(), headers, connect, rx, self.events.clone()));
        self.sockets.insert(conn, Socket { url, outgoing, task });
    }

    pub fn ws_send(&mut self, conn: u64, text: String) {
        match self.sockets.get(&conn) {
            Some(socket) => {
                let _ = socket.outgoing.send(Outgoing::Text(text));
            }
            None => tracing::debug!(conn, "adapter sent on a connection that is not open; dropped"),
        }
    }

    pub fn ws_send_binary(&mut self, conn: u64, data: Vec<u8>) {
        match self.sockets.get(&conn) {
            Some(socket) => {
                let _ = socket.outgoing.send(Outgoing::Binary(data));
            }
            None => tracing::debug!(conn, "adapter sent on a connection that is not open; dropped"),
        }
    }

    pub fn ws_close(&mut self, conn: u64, code: u16, reason: String) {
        if let Some(socket) = self.sockets.get(&conn) {
            let _ = socket.outgoing.send(Outgoing::Close(code, reason));
        }
    }

    /// Forget a socket whose `WsClosed` the adapter has now seen.
    pub fn forget_socket(&mut self, conn: u64) {
        if let Some(socket) = self.sockets.get(&conn) {
            if socket.task.is_finished() {
                self.sockets.remove(&conn);
            }
        }
    }

    pub fn http(&mut self, call: HttpRequest) {
        let HttpRequest { request, method, url, headers, body, timeout_ms, max_response_bytes, bytes } = call;
        let limit = match max_response_bytes {
            0 => DEFAULT_MAX_BODY_BYTES,
            limit => limit.min(CEILING_MAX_BODY_BYTES),
        };
        let events = self.events.clone();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut builder = self.tls.http.request(method, &url);
        if timeout_ms > 0 {
            builder = builder.timeout(Duration::from_millis(timeout_ms));
        }
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        if !body.is_empty() {
            builder = builder.body(body);
        }
        let tls_log = self.tls_log.clone();
        let in_flight = self.http_in_flight.clone();
        let without_query = url.split(['?', '#']).next().unwrap_or_default().to_string();
        in_flight.lock().unwrap().insert(request, without_query);
        self.metrics.http_requests.inc();
        let counted = Held::new(&self.metrics.http_requests_in_flight);
        tokio::spawn(async move {
            let _counted = counted;
            let event = match builder.send().await {
                Ok(response) => read_response(request, response, limit, bytes).await,
                // Never include the URL: it may carry credentials in a query string.
                Err(e) => {
                    let host = e.url().and_then(|u| u.host_str()).unwrap_or("?").to_string();
                    let e = e.without_url();
                    if let Some(cause) = tls::tls_cause(&e) {
                        tls_log.failed(Over::Https, &host, cause);
                    }
                    Event::HttpFailed { request, error: tls::describe(&e).into() }
                }
            };
            let _ = events.send(event);
            in_flight.lock().unwrap().remove(&request);
        });
    }

    pub fn set_timer(&mut self, timer: u64, after_ms: u64) {
        self.cancel_timer(timer);
        let events = self.events.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            let _ = events.send(Event::TimerFired { timer });
        });
        self.timers.insert(timer, task);
    }

    pub fn cancel_timer(&mut self, timer: u64) {
        if let Some(task) = self.timers.remove(&timer) {
            task.abort();
        }
    }

    pub fn timer_fired(&mut self, timer: u64) {
        if self.timers.get(&timer).is_some_and(|t| t.is_finished()) {
            self.timers.remove(&timer);
        }
    }

    /// Drop every socket and timer (the instance is stopping).
    pub fn shut_down(&mut self) {
        for (_, socket) in self.sockets.drain() {
            socket.task.abort();
        }
        for (_, stream) in self.streams.drain() {
            stream.task.abort();
        }
        for (_, timer) in self.timers.drain() {
            timer.abort();
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shut_down();
    }
}

async fn read_response(request: u64, response: reqwest::Response, limit: u64, bytes: bool) -> Event {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(name, value)| value.to_str().ok().map(|v| Header::new(name.as_str(), v)))
        .collect();
    let mut body = Vec::new();
    let mut response = response;
    loop {
        match response.chunk().await {
            Ok(None) => break,
            Ok(Some(chunk)) if (body.len() + chunk.len()) as u64 <= limit => body.extend_from_slice(&chunk),
            Ok(Some(_)) => {
                return Event::HttpFailed { request, error: format!("response body larger than {limit} bytes").into() }
            }
            Err(e) => return Event::HttpFailed { request, error: tls::describe(&e.without_url()).into() },
        }
    }
    if bytes {
        return Event::HttpBytesResponse { request, status, headers, body: body.into() };
    }
    Event::HttpResponse { request, status, headers, body: String::from_utf8_lossy(&body).into_owned().into() }
}

/// Where the host says that a TLS handshake failed: the first failure of each kind with
/// these roots is a warning with the hint that fixes an internal CA, the retries are debug
/// lines (the adapter logs each failure it is told of anyway). Only the host name is said: a
/// URL may carry credentials.
#[derive(Clone)]
struct TlsLog {
    channel: Arc<str>,
    /// Warned for HTTPS, for WebSockets.
    warned: Arc<[AtomicBool; 2]>,
}

impl TlsLog {
    fn new(channel: Arc<str>) -> Self {
        Self { channel, warned: Arc::new([AtomicBool::new(false), AtomicBool::new(false)]) }
    }

    fn failed(&self, over: Over, host: &str, cause: &rustls::Error) {
        let channel = &*self.channel;
        let (what, slot) = match over {
            Over::Https => ("HTTPS", 0),
            Over::WebSocket => ("WebSocket", 1),
        };
        let first = !self.warned[slot].swap(true, Ordering::Relaxed);
        if first {
            tracing::warn!(
                channel,
                host,
                "{what} TLS handshake failed: {cause} (for a server whose certificate comes from an internal CA, \
                 set channels.{channel}.ca_file to that CA's PEM file)"
            );
        } else {
            tracing::debug!(channel, host, "{what} TLS handshake failed again: {cause}");
        }
    }
}

#[derive(Clone, Copy)]
enum Over {
    Https,
    WebSocket,
}

/// How a socket connects.
struct Connect {
    log: TlsLog,
    tls: Arc<rustls::ClientConfig>,
    /// A larger WebSocket message closes the socket (tungstenite's own default is 64 MiB).
    max_message_bytes: usize,
    frames: Arc<tokio::sync::Semaphore>,
    metrics: TransportMetrics,
    opened_before: Arc<AtomicBool>,
}

/// One unit of a gauge, held from its creation until it is dropped (also when the task
/// holding it is aborted).
struct Held(prometheus_client::metrics::gauge::Gauge);

impl Held {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn run_socket(
    conn: u64,
    url: String,
    headers: Vec<(String, String)>,
    connect: Connect,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    events: mpsc::UnboundedSender<Event>,
) {
    let closed = |code: u16, reason: String| Event::WsClosed { conn, code, reason: reason.into() };
    let mut request = match url.as_str().into_client_request() {
        Ok(request) => request,
        Err(e) => {
            let _ = events.send(closed(1006, format!("invalid WebSocket URL: {e}")));
            return;
        }
    };
    for (name, value) in headers {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            (Ok(name), Ok(value)) => {
                request.headers_mut().insert(name, value);
            }
            // The value may be a secret: name the header only.
            _ => tracing::warn!(conn, header = %name, "adapter asked for an invalid WebSocket header; skipped"),
        }
    }
    // Nagle off: a small frame sent (typing) while the server's last frame is still unacked
    // would otherwise hold the next one back until the delayed ACK, tens of milliseconds.
    // The codec zeroes as much of its read buffer as it may fill before every read: at the
    // default 128 KiB that was a 128 KiB memset per ~1 KiB event. Larger frames still arrive
    // whole (the buffer grows for them).
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(connect.max_message_bytes))
        .max_frame_size(Some(connect.max_message_bytes));
    let host = request.uri().host().unwrap_or("?").to_string();
    let connector = Some(Connector::Rustls(connect.tls));
    let mut socket =
        match tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector).await {
            Ok((socket, _response)) => socket,
            Err(e) => {
                if let Some(cause) = tls::tls_cause(&e) {
                    connect.log.failed(Over::WebSocket, &host, cause);
                }
                let _ = events.send(closed(1006, format!("connect failed: {}", tls::describe(&e))));
                return;
            }
        };
    let _connected = Held::new(&connect.metrics.websockets_connected);
    if connect.opened_before.swap(true, Ordering::Relaxed) {
        connect.metrics.websocket_reconnects.inc();
    }
    if events.send(Event::WsOpened { conn }).is_err() {
        return;
    }
    let frames = connect.frames.clone();
    let (code, reason) = loop {
        tokio::select! {
            // The instance holds as many unhandled frames as it takes: wait for room.
            room = frames.acquire(), if frames.available_permits() == 0 => drop(room),
            incoming = socket.next(), if frames.available_permits() > 0 => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if let Ok(permit) = frames.try_acquire() {
                        permit.forget();
                    }
                    let event = match message {
                        Message::Text(text) => Event::WsFrame { conn, text: text.as_str().into() },
                        other => Event::WsBinaryFrame { conn, data: other.into_data().to_vec().into() },
                    };
                    if events.send(event).is_err() {
                        break (1001, "gateway stopping".to_string());
                    }
                }
                // tungstenite queues the pong; flush so it goes out now, not with the next send.
                Some(Ok(Message::Ping(_))) => {
                    if let Err(e) = socket.flush().await {
                        break (1006, format!("write failed: {e}"));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(_pong_or_raw_frame)) => {}
                Some(Err(e)) => break (1006, format!("read failed: {e}")),
                None => break (1006, "connection closed without a close frame".to_string()),
            },
            command = outgoing.recv() => {
                // Frames the adapter asked for meanwhile go out in one write (Nagle is off, so
                // a write per frame would be a packet and a syscall per frame under load).
                let mut next = command;
                let mut written = 0;
                let ended = loop {
                    match next {
                        Some(Outgoing::Text(text)) => {
                            if let Err(e) = socket.feed(Message::Text(text.into())).await {
                                break Some((1006, format!("write failed: {e}")));
                            }
                        }
                        Some(Outgoing::Binary(data)) => {
                            if let Err(e) = socket.feed(Message::Binary(data.into())).await {
                                break Some((1006, format!("write failed: {e}")));
                            }
                        }
                        Some(Outgoing::Close(code, reason)) => {
                            let frame = CloseFrame { code: CloseCode::from(code), reason: reason.clone().into() };
                            let _ = tokio::time::timeout(Duration::from_secs(2), socket.close(Some(frame))).await;
                            break Some((code, reason));
                        }
                        None => break Some((1001, "gateway stopping".to_string())),
                    }
                    written += 1;
                    if written == WRITE_COALESCE {
                        break None;
                    }
                    match outgoing.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break None,
                    }
                };
                if let Some(ended) = ended {
                    break ended;
                }
                if let Err(e) = socket.flush().await {
                    break (1006, format!("write failed: {e}"));
                }
            },
        }
    };
    let _ = events.send(closed(code, reason));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{
        extract::ws::{Message as AxumMessage, WebSocketUpgrade},
        routing::get,
        Router,
    };
    use tokio::sync::mpsc;

    use super::*;

    /// A loopback server: `/bytes/<n>` answers n bytes that are not UTF-8, `/slow` answers
    /// after a second, `/ws` sends one binary message and echoes binary ones back, reversed.
    async fn serve() -> String {
        let app = Router::new()
            .route(
                "/bytes/{n}",
                get(|axum::extract::Path(n): axum::extract::Path<usize>| async move { vec![0xffu8; n] }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    "late"
                }),
            )
            .route(
                "/ws",
                get(|upgrade: WebSocketUpgrade| async move {
                    upgrade.on_upgrade(|mut socket| async move {
                        let _ = socket.send(AxumMessage::Binary(vec![0u8, 159, 146, 150].into())).await;
                        while let Some(Ok(AxumMessage::Binary(data))) = socket.recv().await {
                            let reversed: Vec<u8> = data.iter().rev().copied().collect();
                            let _ = socket.send(AxumMessage::Binary(reversed.into())).await;
                        }
                    })
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("127.0.0.1:{}", address.port())
    }

    fn transport() -> (Transport, mpsc::UnboundedReceiver<Event>) {
        let ws = crate::tls::client_config(&[]);
        let http = crate::tls::http_client(&ws).unwrap();
        let (events, received) = mpsc::unbounded_channel();
        let metrics = Default::default();
        (Transport::new("test", events, crate::tls::ChannelTls { http, ws }, 1 << 20, metrics), received)
    }

    fn call(request: u64, url: String, max_response_bytes: u64, bytes: bool) -> HttpRequest {
        HttpRequest {
            request,
            method: "GET".into(),
            url,
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: 5_000,
            max_response_bytes,
            bytes,
        }
    }

    async fn next(received: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), received.recv()).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn bodies_come_as_bytes_or_text_as_asked_within_the_adapters_limit() {
        let server = serve().await;
        let (mut transport, mut received) = transport();

        transport.http(call(1, format!("http://{server}/bytes/500"), 1_000, true));
        match next(&mut received).await {
            Event::HttpBytesResponse { request: 1, status: 200, body, .. } => {
                assert_eq!(body.to_vec(), vec![0xff; 500])
            }
            other => panic!("a bytes response: {other:?}"),
        }

        transport.http(call(2, format!("http://{server}/bytes/2000"), 1_000, true));
        match next(&mut received).await {
            Event::HttpFailed { request: 2, error } => {
                assert!(error.contains("larger than 1000 bytes"), "{error}")
            }
            other => panic!("over the adapter's limit: {other:?}"),
        }

        // Past the 8 MiB default, within a limit the adapter raised.
        let large = 9 * 1024 * 1024;
        transport.http(call(3, format!("http://{server}/bytes/{large}"), 0, false));
        assert!(matches!(next(&mut received).await, Event::HttpFailed { request: 3, .. }), "the default limit holds");
        transport.http(call(4, format!("http://{server}/bytes/{large}"), 16 * 1024 * 1024, false));
        match next(&mut received).await {
            Event::HttpResponse { request: 4, body, .. } => {
                assert_eq!(body.chars().count(), large, "text, each invalid byte replaced")
            }
            other => panic!("a text response: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_carries_lines_both_ways_is_listed_for_a_handover_and_reports_its_close() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (reader, mut writer) = socket.into_split();
            // Split across writes, CRLF and LF, one line past the adapter's limit.
            writer.write_all(b":irc 001 bot :Welcome\r\nPI").await.unwrap();
            writer.write_all(b"NG :x\n").await.unwrap();
            writer.write_all(format!("{}\r\n", "y".repeat(100)).as_bytes()).await.unwrap();
            let mut lines = BufReader::new(reader).lines();
            let first = lines.next_line().await.unwrap();
            writer.write_all(b"bye\r\n").await.unwrap();
            first
        });
        let (mut transport, mut received) = transport();
        let spec = StreamSpec {
            conn: 3,
            host: "127.0.0.1".into(),
            port,
            tls: false,
            server_name: String::new(),
            lines: true,
            max_line_bytes: 64,
            connect_timeout_ms: 2_000,
        };
        transport.stream_open(spec);
        assert!(matches!(next(&mut received).await, Event::StreamOpened { conn: 3 }));
        let mut lines = Vec::new();
        while lines.len() < 3 {
            match next(&mut received).await {
                Event::StreamLine { conn: 3, line, truncated } => lines.push((line.to_vec(), truncated)),
                other => panic!("a line: {other:?}"),
            }
        }
        assert_eq!(
            lines,
            vec![(b":irc 001 bot :Welcome".to_vec(), false), (b"PING :x".to_vec(), false), (vec![b'y'; 64], true)]
        );
        let open = transport.open_resources();
        assert_eq!(
            open.iter().map(|r| (r.kind, r.id, r.detail.to_string())).collect::<Vec<_>>(),
            vec![(ResourceKind::STREAM, 3, format!("127.0.0.1:{port}"))]
        );
        transport.stream_send(3, b"PONG :x\r\n".to_vec());
        assert_eq!(server.await.unwrap().as_deref(), Some("PONG :x"));
        assert!(matches!(next(&mut received).await, Event::StreamLine { line, .. } if line.as_slice() == b"bye"));
        match next(&mut received).await {
            Event::StreamClosed { conn: 3, reason } => assert!(reason.contains("closed by the peer"), "{reason}"),
            other => panic!("the close: {other:?}"),
        }
        transport.forget_stream(3);
        assert!(transport.open_resources().is_empty());

        // A refused connect is a close with the reason, not a hang.
        let refused = StreamSpec { conn: 4, port, connect_timeout_ms: 1_000, ..StreamSpec::default_for_tests() };
        transport.stream_open(refused);
        match next(&mut received).await {
            Event::StreamClosed { conn: 4, reason } => assert!(reason.contains("connect to 127.0.0.1"), "{reason}"),
            other => panic!("a refused connect: {other:?}"),
        }
    }

    /// A TLS listener on loopback with a certificate for `localhost` from a CA of its own;
    /// it answers one line and echoes the first line it reads. Returns its port and the CA.
    async fn tls_line_server() -> (u16, rustls::pki_types::CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf =
            CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else { continue };
                let (reader, mut writer) = tokio::io::split(tls);
                let _ = writer.write_all(b"hello over tls\r\n").await;
                if let Ok(Some(line)) = BufReader::new(reader).lines().next_line().await {
                    let _ = writer.write_all(format!("echo {line}\r\n").as_bytes()).await;
                    let _ = writer.flush().await;
                }
            }
        });
        (port, ca_cert.der().clone())
    }

    #[tokio::test]
    async fn a_tls_stream_trusts_the_instances_ca_and_checks_the_server_name() {
        let (port, ca) = tls_line_server().await;
        let ws = crate::tls::client_config(&[ca]);
        let http = crate::tls::http_client(&ws).unwrap();
        let (events, mut received) = mpsc::unbounded_channel();
        let mut transport =
            Transport::new("test", events, crate::tls::ChannelTls { http, ws }, 1 << 20, Default::default());
        let spec = StreamSpec {
            conn: 1,
            port,
            tls: true,
            server_name: "localhost".into(),
            connect_timeout_ms: 5_000,
            ..StreamSpec::default_for_tests()
        };
        transport.stream_open(spec.clone());
        assert!(matches!(next(&mut received).await, Event::StreamOpened { conn: 1 }));
        assert!(
            matches!(next(&mut received).await, Event::StreamLine { line, .. } if line.as_slice() == b"hello over tls")
        );
        transport.stream_send(1, b"ping\r\n".to_vec());
        assert!(matches!(next(&mut received).await, Event::StreamLine { line, .. } if line.as_slice() == b"echo ping"));

        // The certificate is for localhost, not for another name.
        transport.stream_open(StreamSpec { conn: 2, server_name: "irc.example.org".into(), ..spec.clone() });
        let closed = loop {
            match next(&mut received).await {
                Event::StreamClosed { conn: 2, reason } => break reason,
                _ => continue,
            }
        };
        assert!(closed.contains("TLS handshake"), "{closed}");
        // Nor does a host without the instance's CA trust it.
        let (mut untrusting, mut untrusting_received) = super::tests::transport();
        untrusting.stream_open(StreamSpec { conn: 3, ..spec });
        match next(&mut untrusting_received).await {
            Event::StreamClosed { conn: 3, reason } => assert!(reason.contains("TLS handshake"), "{reason}"),
            other => panic!("an untrusted certificate is refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_handover_lists_requests_in_flight_and_armed_timers_with_the_sockets() {
        let server = serve().await;
        let (mut transport, mut received) = transport();
        transport.ws_open(7, format!("ws://{server}/ws"), Vec::new());
        assert!(matches!(next(&mut received).await, Event::WsOpened { conn: 7 }));
        transport.http(call(42, format!("http://{server}/slow?access_token=secret"), 0, false));
        transport.set_timer(5, 60_000);

        let open = transport.open_resources();
        let listed: Vec<(u8, u64, String)> = open.iter().map(|r| (r.kind.0, r.id, r.detail.to_string())).collect();
        assert_eq!(
            listed,
            vec![
                (ResourceKind::WEBSOCKET.0, 7, format!("ws://{server}/ws")),
                (ResourceKind::HTTP_REQUEST.0, 42, format!("http://{server}/slow")),
                (ResourceKind::TIMER.0, 5, String::new()),
            ],
            "every kind, and no query string (it may carry a token)"
        );
        // The binary frame the server sent first, then a binary round trip.
        match next(&mut received).await {
            Event::WsBinaryFrame { conn: 7, data } => assert_eq!(data.to_vec(), vec![0u8, 159, 146, 150]),
            other => panic!("a binary frame: {other:?}"),
        }
        transport.ws_send_binary(7, vec![1, 2, 3]);
        match next(&mut received).await {
            Event::WsBinaryFrame { conn: 7, data } => assert_eq!(data.to_vec(), vec![3, 2, 1]),
            other => panic!("the echoed binary frame: {other:?}"),
        }
        assert!(matches!(next(&mut received).await, Event::HttpResponse { request: 42, .. }));
        assert!(
            transport.open_resources().iter().all(|r| r.kind != ResourceKind::HTTP_REQUEST),
            "an answered request is no longer in flight"
        );
    }
}

//! Actions: what an adapter asks of the host. These are plugin-made values; the host copies
//! them into its own types on the adapter's apartment thread (ARCHITECTURE.md §3.7).

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

use crate::Header;

/// The kind of conversation, which decides the session key's `<kind>` part.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// A public channel.
    Channel,
    /// A private channel or a group DM.
    Group,
    /// A one-to-one direct message.
    Dm,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Channel => "channel",
            PeerKind::Group => "group",
            PeerKind::Dm => "dm",
        }
    }
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// A message from a person, accepted by the adapter's policies and handed to the router.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The platform's message id; unique per platform, used to recognise redelivery.
    pub message_id: RString,
    pub peer_kind: PeerKind,
    /// The conversation (channel, group or DM) id.
    pub peer_id: RString,
    /// The thread this message belongs to and the reply should go to ("" when top level).
    pub thread_root_id: RString,
    pub sender_id: RString,
    pub sender_name: RString,
    /// The text for the agent (mention or trigger prefix already stripped).
    pub text: RString,
    pub created_at_ms: i64,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
#[sabi(kind(WithNonExhaustive(size = [u64; 40], traits(Debug, Clone))))]
#[non_exhaustive]
pub enum Action {
    /// Open a WebSocket; ids are chosen by the adapter and scoped to its channel instance.
    WsOpen {
        conn: u64,
        url: RString,
        headers: RVec<Header>,
    },
    WsSend {
        conn: u64,
        text: RString,
    },
    WsClose {
        conn: u64,
        code: u16,
        reason: RString,
    },
    HttpRequest {
        request: u64,
        method: RString,
        url: RString,
        headers: RVec<Header>,
        body: RString,
        timeout_ms: u64,
    },
    /// (Re)arm a one-shot timer; setting an armed timer again moves it.
    SetTimer {
        timer: u64,
        after_ms: u64,
    },
    CancelTimer {
        timer: u64,
    },
    Inbound(InboundMessage),
    ReplyDelivered {
        reply_id: u64,
        platform_message_id: RString,
    },
    ReplyFailed {
        reply_id: u64,
        error: RString,
        retryable: bool,
    },
    /// Persist this private state (handed back after a restart; the handover uses
    /// `export_state` instead).
    SaveState {
        state: crate::StateBlob,
    },
    Log {
        level: LogLevel,
        message: RString,
    },
    /// Whether the adapter can do its work (its platform accepts it and its connection holds).
    /// Unhealthy instances make the host's readiness check fail with `detail` (no secrets in
    /// it); the next `healthy: true` clears that. Adapters that never send it count as healthy.
    Health {
        healthy: bool,
        detail: RString,
    },
    // ---- v1.1 (ABI minor 1): a host of minor 0 ignores these (logged as unknown). ----
    /// Send a binary WebSocket message.
    WsSendBinary {
        conn: u64,
        data: RVec<u8>,
    },
    /// An HTTP request with a bytes body, the adapter's own response size limit and the
    /// body's form in the answer ([`HttpCall`]).
    HttpCall(HttpCall),
    /// An inbound message whose conversation kind is named by the adapter ([`PeerKindName`]),
    /// for kinds beyond [`PeerKind`]'s three; `message.peer_kind` is then ignored.
    InboundOfKind {
        message: InboundMessage,
        kind: PeerKindName,
    },
    /// Like [`Action::ReplyFailed`], with what kind of failure it was ([`ErrorKind`]) and,
    /// when the platform said so, how long to wait before the host hands the reply back
    /// (`0`: the host's own back-off).
    ReplyFailedWith {
        reply_id: u64,
        error: RString,
        kind: ErrorKind,
        retry_after_ms: u64,
    },
    // ---- v1.2 (ABI minor 2): host-owned TCP/TLS streams. ----
    /// Open a TCP connection (TLS optional) the host holds for the channel instance, across
    /// swaps, like a WebSocket: ids share the `conn` space with WebSockets.
    StreamOpen(StreamOpen),
    /// Write bytes to a stream, in order, whole (the adapter frames them: for a line protocol,
    /// end each line itself).
    StreamSend {
        conn: u64,
        data: RVec<u8>,
    },
    /// Close a stream (the host flushes what was sent before, then shuts it down).
    StreamClose {
        conn: u64,
    },
}

/// How a stream's incoming bytes reach the adapter.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Framing(pub u8);

impl Framing {
    /// [`crate::Event::StreamData`] with the bytes as read.
    pub const BYTES: Self = Self(0);
    /// [`crate::Event::StreamLine`] per line (`\n` or `\r\n` ended).
    pub const LINES: Self = Self(1);
}

/// A TCP/TLS stream to open (v1.2). Answered by [`crate::Event::StreamOpened`] or
/// [`crate::Event::StreamClosed`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct StreamOpen {
    pub conn: u64,
    pub host: RString,
    pub port: u16,
    /// TLS over the connection, trusting the system roots and the channel instance's
    /// `ca_file` (host key), as for its `https://` and `wss://`.
    pub tls: bool,
    /// The TLS server name (SNI and certificate check); empty: `host`.
    pub server_name: RString,
    pub framing: Framing,
    /// For [`Framing::LINES`]: the longest line handed over whole (`0`: 8,192 bytes).
    pub max_line_bytes: u32,
    /// `0`: the host's (10 s).
    pub connect_timeout_ms: u64,
}

impl StreamOpen {
    /// A line stream with the default limits.
    pub fn lines(conn: u64, host: &str, port: u16, tls: bool) -> Self {
        Self {
            conn,
            host: host.into(),
            port,
            tls,
            server_name: "".into(),
            framing: Framing::LINES,
            max_line_bytes: 0,
            connect_timeout_ms: 0,
        }
    }
}

/// How the body of an HTTP response reaches the adapter.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseBody(pub u8);

impl ResponseBody {
    /// As text in [`crate::Event::HttpResponse`] (invalid UTF-8 replaced by U+FFFD).
    pub const TEXT: Self = Self(0);
    /// As bytes in [`crate::Event::HttpBytesResponse`].
    pub const BYTES: Self = Self(1);
}

/// An HTTP request (v1.1). The answer is [`crate::Event::HttpResponse`] or
/// [`crate::Event::HttpBytesResponse`] as `response_body` says, or
/// [`crate::Event::HttpFailed`] (no response, or a body larger than `max_response_bytes`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub request: u64,
    pub method: RString,
    pub url: RString,
    pub headers: RVec<Header>,
    pub body: RVec<u8>,
    /// `0`: no timeout of the request's own (the host's connect timeout still applies).
    pub timeout_ms: u64,
    /// The largest body the adapter takes; a larger one fails the request. `0`: the host's
    /// default (8 MiB). The host caps it at 256 MiB.
    pub max_response_bytes: u64,
    pub response_body: ResponseBody,
}

impl HttpCall {
    /// A request with a text body (empty: none), answered as text, default size limit.
    pub fn text(request: u64, method: &str, url: &str, headers: Vec<Header>, body: &str, timeout_ms: u64) -> Self {
        Self {
            request,
            method: method.into(),
            url: url.into(),
            headers: headers.into(),
            body: body.as_bytes().to_vec().into(),
            timeout_ms,
            max_response_bytes: 0,
            response_body: ResponseBody::TEXT,
        }
    }
}

/// A conversation kind named by the adapter: `channel`, `group` and `dm` mean what
/// [`PeerKind`] says; any other name (1–32 of `a-z`, `0-9`, `_`, starting with a letter) is a
/// kind of the adapter's own, keyed by conversation like a channel. It becomes the `<kind>`
/// part of the session key. A name outside that grammar makes the host refuse the message
/// (dead letter, logged).
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerKindName(pub RString);

impl PeerKindName {
    pub fn new(name: &str) -> Self {
        Self(name.into())
    }

    pub fn is_valid(&self) -> bool {
        let name = self.0.as_str();
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && name.len() <= 32
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }
}

impl From<PeerKind> for PeerKindName {
    fn from(kind: PeerKind) -> Self {
        Self::new(kind.as_str())
    }
}

/// What kind of failure an adapter reports. Codes this host does not know count as
/// [`ErrorKind::TRANSIENT`]: a newer adapter's finer kind never loses a reply.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorKind(pub u8);

impl ErrorKind {
    /// Worth trying again (connection lost, server error).
    pub const TRANSIENT: Self = Self(0);
    /// Trying again cannot help (the request is wrong, the content refused).
    pub const PERMANENT: Self = Self(1);
    /// The platform asked to slow down; try again after `retry_after_ms`.
    pub const RATE_LIMITED: Self = Self(2);
    /// The credentials were refused; an operator has to act. Tried again later.
    pub const UNAUTHORIZED: Self = Self(3);
    /// The conversation or thread is gone; trying again cannot help.
    pub const NOT_FOUND: Self = Self(4);

    /// Whether the host should hand the reply back to the adapter later.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::PERMANENT | Self::NOT_FOUND)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TRANSIENT => "transient",
            Self::PERMANENT => "permanent",
            Self::RATE_LIMITED => "rate_limited",
            Self::UNAUTHORIZED => "unauthorized",
            Self::NOT_FOUND => "not_found",
            _ => "unknown",
        }
    }
}

impl Action {
    pub fn into_ne(self) -> Action_NE {
        Action_NE::new(self)
    }
}

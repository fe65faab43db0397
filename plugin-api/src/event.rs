//! Events: what the host hands an adapter. Host-made values, safe for the adapter to keep.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

use crate::{Header, ReplyTarget};

/// A reply the host wants delivered. `reply_id` is the host's; the adapter answers with
/// [`crate::Action::ReplyDelivered`] or [`crate::Action::ReplyFailed`] carrying it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct OutboundReply {
    pub reply_id: u64,
    pub session_key: RString,
    pub target: ReplyTarget,
    pub text: RString,
}

/// Why the adapter is being shut down. On `Replaced` the host keeps the connections for the
/// next generation, so the adapter must not close them.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    Replaced,
    Stopping,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
#[sabi(kind(WithNonExhaustive(size = [u64; 40], traits(Debug, Clone))))]
#[non_exhaustive]
pub enum Event {
    /// The first event of every generation, right after construction: open connections, or
    /// adopt the ones in the handover.
    Started {
        generation: u64,
    },
    WsOpened {
        conn: u64,
    },
    WsFrame {
        conn: u64,
        text: RString,
    },
    /// The connection is gone (closed by the peer, failed to open, or I/O error).
    WsClosed {
        conn: u64,
        code: u16,
        reason: RString,
    },
    HttpResponse {
        request: u64,
        status: u16,
        headers: RVec<Header>,
        body: RString,
    },
    /// The request did not produce a response (connect error, timeout).
    HttpFailed {
        request: u64,
        error: RString,
    },
    TimerFired {
        timer: u64,
    },
    DeliverReply(OutboundReply),
    /// An agent is working on an answer for this target (show a typing indicator).
    AgentWorking {
        target: ReplyTarget,
    },
    Shutdown {
        reason: ShutdownReason,
    },
    /// Instead of a frame the adapter failed on twice (the host dead-lettered it): move any
    /// cursor past it (sequence numbers, last seen post) without acting on it, so a resume
    /// or catch-up does not bring it back.
    WsFrameSkipped {
        conn: u64,
        text: RString,
    },
    /// The next [`Event::DeliverReply`] with this id was queued before the gateway restarted
    /// and may have been handed out then: it may already be on the platform (the adapter's
    /// saved state can be older than the post). Look for it before posting it again; the
    /// platform's own de-duplication (Mattermost's lasts 30 s) is not to be relied on.
    ReplyMayHaveGoneOut {
        reply_id: u64,
    },
    // ---- v1.1 (ABI minor 1): only ever sent to adapters that report `abi_minor >= 1`. ----
    /// A binary WebSocket message (text ones are [`Event::WsFrame`]).
    WsBinaryFrame {
        conn: u64,
        data: RVec<u8>,
    },
    /// The answer to an [`crate::Action::HttpCall`] that asked for
    /// [`crate::ResponseBody::BYTES`]: the body exactly as received.
    HttpBytesResponse {
        request: u64,
        status: u16,
        headers: RVec<Header>,
        body: RVec<u8>,
    },
    /// Instead of an HTTP response the adapter failed on twice (the host dead-lettered it):
    /// take from it only what moves a cursor (a sync token, a page mark) without acting on
    /// its content, so the next request does not bring the same content back. Adapters of
    /// ABI minor 0 get [`Event::HttpFailed`] instead.
    HttpResponseSkipped {
        request: u64,
        status: u16,
        headers: RVec<Header>,
        body: RVec<u8>,
    },
    // ---- v1.2 (ABI minor 2): host-owned TCP/TLS streams ([`crate::StreamOpen`]). ----
    /// The stream connected (and finished its TLS handshake, when asked for).
    StreamOpened {
        conn: u64,
    },
    /// Bytes read from a stream opened with [`crate::Framing::BYTES`], as they came.
    StreamData {
        conn: u64,
        data: RVec<u8>,
    },
    /// One line read from a stream opened with [`crate::Framing::LINES`], without its `\n`
    /// or `\r\n`. A line longer than the stream's `max_line_bytes` arrives cut to that length
    /// with `truncated` set (the rest up to the line end is dropped).
    StreamLine {
        conn: u64,
        line: RVec<u8>,
        truncated: bool,
    },
    /// The stream is gone (closed by the peer, failed to connect, TLS failure, I/O error, or
    /// closed on the adapter's request); `reason` says which.
    StreamClosed {
        conn: u64,
        reason: RString,
    },
    // ---- v1.2 (ABI minor 2), too: only ever sent to adapters that report `abi_minor >= 2`. ----
    /// A text frame the host dead-lettered earlier (the adapter then got it as
    /// [`Event::WsFrameSkipped`]), handed again because an operator asked for it
    /// (`switchboard dead-letters replay`). Act on its content as on a new frame's, also when
    /// the skip made it look seen before, but move no sequence number or cursor: it is not
    /// from the socket. The host hands each dead letter over once, and stores at most one
    /// inbound message per platform message id.
    WsFrameReplayed {
        text: RString,
    },
}

impl Event {
    pub fn into_ne(self) -> Event_NE {
        Event_NE::new(self)
    }
}

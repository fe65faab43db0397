//! Host-owned TCP/TLS streams (ABI v1.2): connect, read into lines or chunks, write in
//! order. The task belongs to the channel instance, like a WebSocket's: a swap hands the open
//! stream to the next generation, and the server sees no reconnect.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use switchboard_plugin_api::Event;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

/// How long a connect (and TLS handshake) may take when the adapter says nothing.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest line handed over whole when the adapter says nothing.
const DEFAULT_MAX_LINE_BYTES: usize = 8192;

/// Bytes read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A stream the adapter asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub conn: u64,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Empty: `host`.
    pub server_name: String,
    /// `StreamLine` events (else `StreamData`).
    pub lines: bool,
    /// 0: the host default (8 KiB).
    pub max_line_bytes: u32,
    /// 0: the host default (10 s).
    pub connect_timeout_ms: u64,
}

impl StreamSpec {
    #[cfg(test)]
    pub(crate) fn default_for_tests() -> Self {
        Self {
            conn: 0,
            host: "127.0.0.1".into(),
            port: 0,
            tls: false,
            server_name: String::new(),
            lines: true,
            max_line_bytes: 0,
            connect_timeout_ms: 0,
        }
    }

    /// `host:port`, for logs and the handover list.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

pub(super) enum StreamOutgoing {
    Data(Vec<u8>),
    Close,
}

/// What a stream's task needs besides its spec.
pub(super) struct StreamLink {
    pub tls: Arc<rustls::ClientConfig>,
    pub frames: Arc<tokio::sync::Semaphore>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// Connect, then read and write until either side ends; the last event is `StreamClosed`.
pub(super) async fn run_stream(spec: StreamSpec, link: StreamLink, outgoing: mpsc::UnboundedReceiver<StreamOutgoing>) {
    let conn = spec.conn;
    let events = link.events.clone();
    let reason = match connect(&spec, &link).await {
        Err(reason) => reason,
        Ok(Connected::Plain(stream)) => serve(stream, &spec, &link, outgoing).await,
        Ok(Connected::Tls(stream)) => serve(*stream, &spec, &link, outgoing).await,
    };
    let _ = events.send(Event::StreamClosed { conn, reason: reason.into() });
}

enum Connected {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect(spec: &StreamSpec, link: &StreamLink) -> Result<Connected, String> {
    let timeout = match spec.connect_timeout_ms {
        0 => DEFAULT_CONNECT_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    let address = spec.address();
    let attempt = async {
        let tcp = TcpStream::connect((spec.host.as_str(), spec.port))
            .await
            .map_err(|e| format!("connect to {address} failed: {e}"))?;
        // Lines are small and a reply should not wait for the previous one's ACK.
        let _ = tcp.set_nodelay(true);
        if !spec.tls {
            return Ok(Connected::Plain(tcp));
        }
        let name = if spec.server_name.is_empty() { spec.host.as_str() } else { spec.server_name.as_str() };
        let server_name =
            ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?} is no TLS server name: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(link.tls.clone());
        let stream = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {address} failed: {e}"))?;
        Ok(Connected::Tls(Box::new(stream)))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("connect to {address} timed out after {timeout:?}")),
    }
}

/// Read and write on an open stream; the reason it ended.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    spec: &StreamSpec,
    link: &StreamLink,
    mut outgoing: mpsc::UnboundedReceiver<StreamOutgoing>,
) -> String {
    let conn = spec.conn;
    if link.events.send(Event::StreamOpened { conn }).is_err() {
        return "gateway stopping".into();
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut framer = LineFramer::new(match spec.max_line_bytes {
        0 => DEFAULT_MAX_LINE_BYTES,
        n => n as usize,
    });
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        tokio::select! {
            // The instance holds as many unhandled lines as it takes: wait for room.
            room = link.frames.acquire(), if link.frames.available_permits() == 0 => drop(room),
            read = reader.read(&mut chunk), if link.frames.available_permits() > 0 => match read {
                Ok(0) => return "closed by the peer".into(),
                Ok(n) => {
                    let received: Vec<Event> = if spec.lines {
                        framer
                            .push(&chunk[..n])
                            .into_iter()
                            .map(|(line, truncated)| Event::StreamLine { conn, line: line.into(), truncated })
                            .collect()
                    } else {
                        vec![Event::StreamData { conn, data: chunk[..n].to_vec().into() }]
                    };
                    for event in received {
                        if let Ok(permit) = link.frames.try_acquire() {
                            permit.forget();
                        }
                        if link.events.send(event).is_err() {
                            return "gateway stopping".into();
                        }
                    }
                }
                Err(e) => return format!("read failed: {e}"),
            },
            command = outgoing.recv() => match command {
                Some(StreamOutgoing::Data(data)) => {
                    if let Err(e) = writer.write_all(&data).await {
                        return format!("write failed: {e}");
                    }
                    // Whatever else the adapter asked for meanwhile goes out before the flush.
                    let mut closing = false;
                    while let Ok(more) = outgoing.try_recv() {
                        match more {
                            StreamOutgoing::Data(data) => {
                                if let Err(e) = writer.write_all(&data).await {
                                    return format!("write failed: {e}");
                                }
                            }
                            StreamOutgoing::Close => {
                                closing = true;
                                break;
                            }
                        }
                    }
                    if let Err(e) = writer.flush().await {
                        return format!("write failed: {e}");
                    }
                    if closing {
                        let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
                        return "closed by the adapter".into();
                    }
                }
                Some(StreamOutgoing::Close) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
                    return "closed by the adapter".into();
                }
                None => return "gateway stopping".into(),
            },
        }
    }
}

/// Splits bytes into lines (`\n`, with a `\r` before it dropped). A line longer than the
/// limit is handed on cut to the limit, marked truncated, and the rest of it is skipped.
pub(super) struct LineFramer {
    max: usize,
    partial: Vec<u8>,
    /// The current line was already handed on cut: skip to its end.
    skipping: bool,
}

impl LineFramer {
    pub(super) fn new(max: usize) -> Self {
        Self { max: max.max(1), partial: Vec::new(), skipping: false }
    }

    /// The lines `bytes` completes, with whether each was cut.
    pub(super) fn push(&mut self, mut bytes: &[u8]) -> Vec<(Vec<u8>, bool)> {
        let mut lines = Vec::new();
        while !bytes.is_empty() {
            let end = bytes.iter().position(|b| *b == b'\n');
            let (piece, rest, complete) = match end {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if self.skipping {
                if complete {
                    self.skipping = false;
                }
                continue;
            }
            self.partial.extend_from_slice(piece);
            if complete {
                let mut line = std::mem::take(&mut self.partial);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > self.max {
                    line.truncate(self.max);
                    lines.push((line, true));
                } else {
                    lines.push((line, false));
                }
            } else if self.partial.len() > self.max {
                let mut line = std::mem::take(&mut self.partial);
                line.truncate(self.max);
                lines.push((line, true));
                self.skipping = true;
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::LineFramer;

    #[test]
    fn lines_are_split_at_newlines_across_reads_and_long_ones_cut_once() {
        let mut framer = LineFramer::new(8);
        assert_eq!(framer.push(b"PING :a\r\nPRI"), vec![(b"PING :a".to_vec(), false)]);
        assert_eq!(framer.push(b"V\n\n"), vec![(b"PRIV".to_vec(), false), (Vec::new(), false)]);
        // 20 bytes without a newline: handed on cut at 8, the rest of the line skipped.
        assert_eq!(framer.push(b"0123456789abcdefghij"), vec![(b"01234567".to_vec(), true)]);
        assert_eq!(framer.push(b"klm\r\nnext\r\n"), vec![(b"next".to_vec(), false)]);
        // A long line that ends within the same read.
        assert_eq!(framer.push(b"0123456789\nok\n"), vec![(b"01234567".to_vec(), true), (b"ok".to_vec(), false)]);
    }
}

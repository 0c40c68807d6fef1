//! A framing guard in front of hyper's HTTP/1.1 parser.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding` by dropping
//! the length (RFC 9112 §6.3 allows it), so the handler cannot tell such a request from a clean
//! chunked one. A proxy must refuse it (request smuggling, Envoy `TestSmuggling`). This guard
//! follows the HTTP/1.1 message boundaries of the byte stream (header sections, then
//! Content-Length or chunked bodies), checks each header section with httparse, and replaces a
//! section with ambiguous framing by one that hyper always answers with 400 and a close. h2
//! (prior knowledge) passes through untouched.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Largest header section the guard buffers unless told otherwise (`with_max_head`); a longer
/// one is handed to hyper, which answers 431.
const MAX_HEAD: usize = 64 * 1024;
/// A request hyper refuses with 400 (a transfer coding that is not chunked) and then closes.
const REFUSED: &[u8] = b"POST / HTTP/1.1\r\nhost: refused\r\ntransfer-encoding: refused\r\n\r\n";
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug)]
enum State {
    /// Collecting a header section.
    Head(Vec<u8>),
    /// `n` body bytes to pass.
    Body(u64),
    /// A chunk-size line being read.
    ChunkSize(Vec<u8>),
    /// `n` chunk bytes then CRLF to pass.
    ChunkData(u64),
    /// Trailer lines after the last chunk, until an empty line.
    Trailers(Vec<u8>),
    /// No more checking: h2, or framing the guard cannot follow (hyper refuses it).
    Pass,
    /// A section was refused: nothing after it reaches hyper.
    Refused,
}

/// Wraps the app's TCP stream.
#[derive(Debug)]
pub(crate) struct FramingGuard<T> {
    inner: T,
    state: State,
    /// Bytes ready for hyper.
    out: Vec<u8>,
    out_pos: usize,
    /// Set by the sidecar when it answers 101 (a WebSocket upgrade): the bytes after the
    /// upgrade request are the new protocol's, not HTTP/1.1, and pass unchecked.
    switched: Arc<AtomicBool>,
    /// Longest header section or trailer line judged; longer ones pass to hyper unjudged, so
    /// this must cover every head hyper can parse (see `l7::limits::guard_head`).
    max_head: usize,
    /// Time allowed for a request head (slowloris): the first from the start, every later
    /// one from its first byte; idle time between requests is not counted.
    head_timeout: Option<Duration>,
    /// Running while a head is due.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether a head has been judged: after that, an empty head buffer is an idle connection.
    judged_once: bool,
}

impl<T> FramingGuard<T> {
    /// Guards `inner`.
    pub(crate) fn new(inner: T) -> Self {
        FramingGuard {
            inner,
            state: State::Head(Vec::new()),
            out: Vec::new(),
            out_pos: 0,
            switched: Arc::default(),
            max_head: MAX_HEAD,
            head_timeout: None,
            deadline: None,
            judged_once: false,
        }
    }

    /// Ends the connection with `TimedOut` when a request head takes longer than `limit`.
    pub(crate) fn with_head_timeout(mut self, limit: Duration) -> Self {
        self.head_timeout = Some(limit);
        self
    }

    /// Whether a request head is awaited against the clock now.
    fn head_due(&self) -> bool {
        match &self.state {
            State::Head(acc) => !acc.is_empty() || !self.judged_once,
            _ => false,
        }
    }

    /// Starts the head deadline when a head becomes due, and drops it when none is.
    fn arm(&mut self) {
        let Some(limit) = self.head_timeout else {
            return;
        };
        if !self.head_due() {
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(limit)));
        }
    }

    /// Whether the head deadline has passed (registers for a wake-up otherwise).
    fn head_late(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }

    /// The flag to set when the connection switches protocols (before the 101 is written).
    /// Until then an `Upgrade` request is HTTP/1.1 like any other: a declined upgrade leaves
    /// the next request on the connection to be judged like the first.
    pub(crate) fn switch_flag(&self) -> Arc<AtomicBool> {
        self.switched.clone()
    }

    /// After a switch, hands what was held back (the first bytes of the new protocol) to
    /// hyper's upgraded connection, and passes everything from then on.
    fn pass_after_switch(&mut self) {
        if matches!(self.state, State::Pass) || !self.switched.load(Ordering::Acquire) {
            return;
        }
        match std::mem::replace(&mut self.state, State::Pass) {
            State::Head(held) | State::ChunkSize(held) | State::Trailers(held) => {
                self.out.extend_from_slice(&held)
            }
            State::Refused => self.state = State::Refused,
            _ => {}
        }
    }

    /// Follows header sections up to `max_head` bytes.
    pub(crate) fn with_max_head(mut self, max_head: usize) -> Self {
        self.max_head = max_head;
        self
    }

    /// Feeds bytes read from the app through the state machine into `out`.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let used = match &mut self.state {
                State::Pass => {
                    self.out.extend_from_slice(data);
                    data.len()
                }
                State::Refused => data.len(),
                State::Head(acc) => {
                    let (used, done) = take_until(acc, data, b"\r\n\r\n", self.max_head);
                    if done {
                        let head = std::mem::take(acc);
                        self.state = self.judge(head);
                    } else if acc.len() >= self.max_head {
                        // Too long to judge: hyper refuses it with 431 and closes.
                        self.out.append(acc);
                        self.state = State::Pass;
                    }
                    used
                }
                State::Body(n) => {
                    let take = pass(&mut self.out, n, data);
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    take
                }
                State::ChunkSize(line) => {
                    let (used, done) = take_until(line, data, b"\n", 1024);
                    if done || line.len() >= 1024 {
                        let line = std::mem::take(line);
                        self.out.extend_from_slice(&line);
                        // The data then its CRLF; a size too large to add 2 to is hyper's to refuse.
                        self.state = match chunk_size(&line) {
                            Some(0) => State::Trailers(Vec::new()),
                            Some(n) => n.checked_add(2).map_or(State::Pass, State::ChunkData),
                            None => State::Pass,
                        };
                    }
                    used
                }
                State::ChunkData(n) => {
                    let take = pass(&mut self.out, n, data);
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                    take
                }
                State::Trailers(line) => {
                    let (used, done) = take_until(line, data, b"\n", self.max_head);
                    if done || line.len() >= self.max_head {
                        let line = std::mem::take(line);
                        self.out.extend_from_slice(&line);
                        let empty = line == b"\r\n" || line == b"\n";
                        self.state = if empty {
                            State::Head(Vec::new())
                        } else {
                            State::Trailers(Vec::new())
                        };
                    }
                    used
                }
            };
            data = &data[used..];
        }
    }

    /// Decides on a complete (or over-long) header section and what follows it.
    fn judge(&mut self, head: Vec<u8>) -> State {
        self.judged_once = true;
        if head.starts_with(H2_PREFACE) {
            self.out.extend_from_slice(&head);
            return State::Pass;
        }
        match inspect(&head) {
            Verdict::Refuse => {
                self.out.extend_from_slice(REFUSED);
                State::Refused
            }
            Verdict::Next(state) => {
                self.out.extend_from_slice(&head);
                state
            }
        }
    }
}

/// Passes up to `n` bytes of `data` to `out` and counts them off `n`; returns how many.
fn pass(out: &mut Vec<u8>, n: &mut u64, data: &[u8]) -> usize {
    let take = usize::try_from(*n).map_or(data.len(), |n| n.min(data.len()));
    out.extend_from_slice(&data[..take]);
    *n -= take as u64;
    take
}

/// Appends `data` to `acc` up to and including `end` (or `limit`); returns bytes used and
/// whether `end` was reached.
fn take_until(acc: &mut Vec<u8>, data: &[u8], end: &[u8], limit: usize) -> (usize, bool) {
    for (i, &b) in data.iter().enumerate() {
        acc.push(b);
        if acc.ends_with(end) {
            return (i + 1, true);
        }
        if acc.len() >= limit {
            return (i + 1, false);
        }
    }
    (data.len(), false)
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let hex = text.split(';').next()?.trim();
    u64::from_str_radix(hex, 16).ok()
}

enum Verdict {
    Refuse,
    Next(State),
}

/// Checks one header section: framing must be unambiguous (RFC 9112 §6).
fn inspect(head: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    // A section httparse refuses (obs-fold, bad syntax, too many headers) is refused here too.
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return Verdict::Refuse;
    };
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.push(h.value);
        }
        // `Upgrade` does not stop the checks: unless the sidecar answers 101 (see
        // `FramingGuard::switch_flag`), the connection stays HTTP/1.1 and the next request on
        // it must be judged like the first.
    }
    match (lengths.as_slice(), codings.as_slice()) {
        ([], []) => Verdict::Next(State::Head(Vec::new())),
        ([len], []) => match std::str::from_utf8(len)
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(0) => Verdict::Next(State::Head(Vec::new())),
            Some(n) => Verdict::Next(State::Body(n)),
            None => Verdict::Refuse,
        },
        ([], [te]) if te.eq_ignore_ascii_case(b"chunked") => {
            Verdict::Next(State::ChunkSize(Vec::new()))
        }
        _ => Verdict::Refuse,
    }
}

#[cfg(feature = "fuzzing")]
impl FramingGuard<()> {
    /// Feeds `data` as if read from the app; the bytes passed on to hyper so far.
    pub(crate) fn feed_bytes(&mut self, data: &[u8]) -> &[u8] {
        self.feed(data);
        &self.out[self.out_pos..]
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            this.pass_after_switch();
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.state {
                // After a refused section nothing more reaches hyper: it answers 400 and closes.
                State::Refused => return Poll::Ready(Ok(())),
                // Nothing left to check (h2, an upgrade): read straight into hyper's buffer.
                State::Pass => return Pin::new(&mut this.inner).poll_read(cx, buf),
                _ => {}
            }
            this.arm();
            // Not zeroed: a zeroed 16 KiB buffer on every poll (a `Pending` one included) was
            // a measurable memset per request; the reader fills what it reports.
            let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
            let mut rb = ReadBuf::uninit(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let read = rb.filled();
                    if read.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.feed(read);
                }
                Poll::Pending if this.head_late(cx) => {
                    tracing::debug!("app connection closed: request head not complete in time");
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete in time (limits.header_read_timeout)",
                    );
                    return Poll::Ready(Err(e));
                }
                other => return other,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_after_an_accepted_upgrade_pass_unchecked() {
        let mut g = FramingGuard::new(());
        g.feed(b"GET /chat HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x02hi");
        assert!(
            g.out.ends_with(b"\r\n\r\n"),
            "the frame waits for a decision"
        );
        g.switch_flag().store(true, Ordering::Release);
        g.pass_after_switch();
        assert!(g.out.ends_with(b"\r\n\r\n\x81\x02hi"));
        g.feed(b"\x81\x03abc");
        assert!(g.out.ends_with(b"\x81\x03abc"));
    }

    #[test]
    fn a_declined_upgrade_leaves_the_next_request_checked() {
        let mut g = FramingGuard::new(());
        g.feed(
            b"GET /chat HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        );
        g.pass_after_switch();
        g.feed(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(g.out.ends_with(REFUSED));
    }

    fn run(input: &[u8]) -> Vec<u8> {
        let mut g = FramingGuard::new(());
        for chunk in input.chunks(7) {
            g.feed(chunk);
        }
        g.out
    }

    #[test]
    fn clean_keep_alive_traffic_passes_unchanged() {
        let clean = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(clean), clean.to_vec());
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00";
        assert_eq!(run(h2), h2.to_vec());
    }

    #[test]
    fn an_upgrade_request_does_not_turn_the_checks_off() {
        let mut input =
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
                .to_vec();
        let want = input.clone();
        input.extend_from_slice(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let mut want = want;
        want.extend_from_slice(REFUSED);
        assert_eq!(run(&input), want);
    }

    #[test]
    fn a_chunk_size_at_the_limit_of_u64_is_left_to_hyper() {
        let input = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc";
        assert_eq!(run(input), input.to_vec());
    }

    #[test]
    fn ambiguous_sections_are_replaced_even_after_clean_ones() {
        let first = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        ] {
            let mut input = first.clone();
            input.extend_from_slice(bad);
            input.extend_from_slice(b"GET /smuggled HTTP/1.1\r\n\r\n");
            let mut want = first.clone();
            want.extend_from_slice(REFUSED);
            assert_eq!(run(&input), want, "{}", String::from_utf8_lossy(bad));
        }
    }
}

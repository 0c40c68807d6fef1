//! Makes the `:authority` of gRPC clients on a Unix socket acceptable to the HTTP/2 server.
//!
//! gRPC's C core (Python, C++, Ruby... from 1.57 on) sends the percent-encoded socket path as
//! `:authority` (`tmp%2Fhalyard%2Fworkload.sock`), grpc-java the raw path. Neither is an
//! authority (RFC 3986 §3.2: no `/`, and `%` only in the forms RFC 9110 rules out for HTTP), and
//! the `h2` crate under tonic resets such a stream with PROTOCOL_ERROR before any service sees
//! it (hyperium/h2 issue 442, pull request 487, still open). Go clients send `localhost`. So that
//! every client library works, the bytes the app sends pass through [`AuthorityFix`], which
//! rewrites such a value in the HPACK block (RFC 7541) of each request's HEADERS (and
//! CONTINUATION) frames (RFC 9113 §6.2, §6.10): every byte that may not appear in a reg-name is
//! replaced with `-`. The value keeps its length, so frame lengths and the HPACK dynamic table
//! (entry size = name + value + 32, RFC 7541 §4.1) stay exactly as the client counts them.
//!
//! Only literal values are rewritten: a Huffman-coded one (RFC 7541 §5.2) passes unchanged, as
//! does anything that does not parse; the server then answers as it would have. Nothing here
//! trusts the client: lengths are checked against what was read, and a header block larger than
//! [`MAX_BLOCK`] passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest header block (all its frames) held back to be rewritten.
pub(crate) const MAX_BLOCK: usize = 64 * 1024;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 8 * 1024;

/// Where the byte stream from the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes of the connection preface still to pass.
    Preface(usize),
    /// At a frame header.
    Frame,
    /// Inside a frame that is not part of a header block: bytes still to pass.
    Pass(usize),
    /// A header block begun in `block`, waiting for CONTINUATION frames.
    Block,
}

/// The rewriting state machine, without I/O: bytes in with [`Rewriter::feed`], bytes out with
/// [`Rewriter::take`].
#[derive(Debug)]
pub(crate) struct Rewriter {
    state: State,
    input: BytesMut,
    output: BytesMut,
    /// The frames of the header block being collected, headers included.
    block: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            state: State::Preface(PREFACE_LEN),
            input: BytesMut::new(),
            output: BytesMut::new(),
            block: Vec::new(),
        }
    }
}

impl Rewriter {
    /// Takes bytes read from the client.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        self.advance();
    }

    /// The client sent no more: whatever is held back passes as it is.
    pub(crate) fn finish(&mut self) {
        self.output.extend_from_slice(&self.block);
        self.block.clear();
        let rest = self.input.split();
        self.output.extend_from_slice(&rest);
    }

    /// Bytes ready for the server.
    pub(crate) fn take(&mut self) -> BytesMut {
        self.output.split()
    }

    fn advance(&mut self) {
        while self.step() {}
    }

    /// One move of the state machine; false when it needs more input.
    fn step(&mut self) -> bool {
        match self.state {
            State::Preface(left) | State::Pass(left) => {
                let n = left.min(self.input.len());
                let chunk = self.input.split_to(n);
                self.output.extend_from_slice(&chunk);
                self.state = match (self.state, left - n) {
                    (_, 0) => State::Frame,
                    (State::Preface(_), l) => State::Preface(l),
                    (_, l) => State::Pass(l),
                };
                // Zero bytes moved only when input ran out or the frame was empty.
                !self.input.is_empty()
            }
            State::Frame | State::Block => self.frame(),
        }
    }

    /// At a frame header: a frame of a header block is collected whole, any other passes.
    fn frame(&mut self) -> bool {
        let Some(header) = self.input.get(..FRAME_HEADER_LEN) else {
            return false;
        };
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let in_block = self.state == State::Block;
        let of_block = (!in_block && kind == HEADERS) || (in_block && kind == CONTINUATION);
        if !of_block || self.block.len() + FRAME_HEADER_LEN + len > MAX_BLOCK {
            // Not ours to touch (or too big to hold): pass what was held and this frame.
            let held = std::mem::take(&mut self.block);
            self.output.extend_from_slice(&held);
            let head = self.input.split_to(FRAME_HEADER_LEN);
            self.output.extend_from_slice(&head);
            self.state = State::Pass(len);
            return true;
        }
        if self.input.len() < FRAME_HEADER_LEN + len {
            return false;
        }
        let frame = self.input.split_to(FRAME_HEADER_LEN + len);
        self.block.extend_from_slice(&frame);
        if flags & END_HEADERS == 0 {
            self.state = State::Block;
            return true;
        }
        let mut block = std::mem::take(&mut self.block);
        fix_block(&mut block);
        self.output.extend_from_slice(&block);
        self.state = State::Frame;
        true
    }
}

/// Runs a whole client byte stream, read in `chunks`, through a [`Rewriter`].
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn rewrite_all<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    for c in chunks {
        r.feed(c);
        out.extend_from_slice(&r.take());
    }
    r.finish();
    out.extend_from_slice(&r.take());
    out
}

/// Where each fragment of a header block lies in its frames: (start, end) offsets.
fn fragments(frames: &[u8]) -> Option<Vec<(usize, usize)>> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < frames.len() {
        let h = frames.get(at..at + FRAME_HEADER_LEN)?;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let payload = at + FRAME_HEADER_LEN;
        let end = payload + len;
        let (mut start, mut stop) = (payload, end);
        if kind == HEADERS && flags & PADDED != 0 {
            let pad = usize::from(*frames.get(payload)?);
            start += 1;
            stop = stop.checked_sub(pad)?;
        }
        if kind == HEADERS && flags & PRIORITY != 0 {
            start += 5;
        }
        if start > stop || end > frames.len() {
            return None;
        }
        spans.push((start, stop));
        at = end;
    }
    Some(spans)
}

/// Rewrites an unusable `:authority` in the header block carried by `frames`, in place.
fn fix_block(frames: &mut [u8]) {
    let Some(spans) = fragments(frames) else {
        return;
    };
    let mut hpack: Vec<u8> = spans
        .iter()
        .flat_map(|&(s, e)| frames[s..e].iter().copied())
        .collect();
    if !fix_authority(&mut hpack) {
        return;
    }
    let mut from = 0;
    for (s, e) in spans {
        frames[s..e].copy_from_slice(&hpack[from..from + (e - s)]);
        from += e - s;
    }
}

/// An HPACK integer with an `n`-bit prefix at `at` (RFC 7541 §5.1): (value, next offset).
fn integer(b: &[u8], at: usize, n: u32) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*b.get(at)?) & max;
    let mut at = at + 1;
    if value < max {
        return Some((value, at));
    }
    let mut shift = 0u32;
    loop {
        let byte = *b.get(at)?;
        at += 1;
        value = value.checked_add(usize::from(byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some((value, at));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// A string literal at `at` (RFC 7541 §5.2): (Huffman-coded, start, end).
fn string(b: &[u8], at: usize) -> Option<(bool, usize, usize)> {
    let huffman = *b.get(at)? & 0x80 != 0;
    let (len, start) = integer(b, at, 7)?;
    let end = start.checked_add(len)?;
    (end <= b.len()).then_some((huffman, start, end))
}

/// Static table index of `:authority` (RFC 7541 Appendix A).
const AUTHORITY_INDEX: usize = 1;

/// One header field representation at `at` (RFC 7541 §6): where the next one starts, and the
/// span of its value if it is a literal, non-Huffman `:authority`. `None` when it does not parse.
fn field(b: &[u8], at: usize) -> Option<(usize, Option<(usize, usize)>)> {
    let first = *b.get(at)?;
    let prefix = match first {
        // Indexed field, or a dynamic table size update: nothing literal.
        f if f & 0x80 != 0 => return Some((integer(b, at, 7)?.1, None)),
        f if f & 0xe0 == 0x20 => return Some((integer(b, at, 5)?.1, None)),
        // Literal with incremental indexing; else without indexing or never indexed.
        f if f & 0xc0 == 0x40 => 6,
        _ => 4,
    };
    let (index, mut next) = integer(b, at, prefix)?;
    let named = if index == 0 {
        let (huffman, s, e) = string(b, next)?;
        next = e;
        !huffman && &b[s..e] == b":authority"
    } else {
        index == AUTHORITY_INDEX
    };
    let (huffman, s, e) = string(b, next)?;
    Some((e, (named && !huffman).then_some((s, e))))
}

/// Rewrites each literal `:authority` value that is not a valid authority; true if any was.
fn fix_authority(b: &mut [u8]) -> bool {
    let mut at = 0;
    let mut changed = false;
    while at < b.len() {
        let Some((next, authority)) = field(b, at) else {
            return changed;
        };
        at = next;
        let Some((s, e)) = authority else { continue };
        if http::uri::Authority::try_from(&b[s..e]).is_err() {
            for c in &mut b[s..e] {
                if !(c.is_ascii_alphanumeric() || matches!(*c, b'-' | b'.' | b'_' | b'~')) {
                    *c = b'-';
                }
            }
            changed = true;
        }
    }
    changed
}

/// A client connection whose incoming bytes pass through a [`Rewriter`]; writes go straight
/// to the socket.
#[derive(Debug)]
pub(crate) struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    ready: BytesMut,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub(crate) fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::default(),
            ready: BytesMut::new(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    this.rewriter.finish();
                    this.eof = true;
                }
                Poll::Ready(Ok(())) => this.rewriter.feed(read.filled()),
            }
            this.ready = this.rewriter.take();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// The start of what grpc-python 1.85 sends: `:path` and `:authority` as literals with
    /// incremental indexing and new names, then indexed fields.
    fn grpc_core_block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x40, 5];
        b.extend_from_slice(b":path");
        b.extend_from_slice(&[4]);
        b.extend_from_slice(b"/x/y");
        b.extend_from_slice(&[0x40, 10]);
        b.extend_from_slice(b":authority");
        b.push(authority.len() as u8);
        b.extend_from_slice(authority);
        b.extend_from_slice(&[0x83, 0x86]);
        b
    }

    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        rewrite_all(chunks.iter().copied())
    }

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = PREFACE.to_vec();
        for f in frames {
            s.extend_from_slice(f);
        }
        s
    }

    #[test]
    fn a_percent_encoded_socket_path_becomes_a_reg_name_of_the_same_length() {
        let bad = b"tmp%2Fhalyard%2Fworkload.sock";
        let input = stream(&[frame(HEADERS, END_HEADERS, &grpc_core_block(bad))]);
        let want = stream(&[frame(
            HEADERS,
            END_HEADERS,
            &grpc_core_block(b"tmp-2Fhalyard-2Fworkload.sock"),
        )]);
        assert_eq!(run(&[&input]), want);
        // Byte by byte, as a slow socket may deliver it.
        let singles: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&singles), want);
    }

    #[test]
    fn a_valid_authority_and_other_frames_pass_unchanged() {
        let settings = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, 0x1, b"%2F/not a header");
        let input = stream(&[
            settings,
            frame(HEADERS, END_HEADERS, &grpc_core_block(b"localhost:8080")),
            data,
        ]);
        assert_eq!(run(&[&input]), input);
    }

    #[test]
    fn the_static_name_index_and_a_raw_path_are_rewritten() {
        // Literal without indexing, name = static index 1, as grpc-java sends the raw path.
        let mut block = vec![0x01, 16];
        block.extend_from_slice(b"/run/h/work.sock");
        let input = stream(&[frame(HEADERS, END_HEADERS, &block)]);
        let mut want_block = vec![0x01, 16];
        want_block.extend_from_slice(b"-run-h-work.sock");
        assert_eq!(
            run(&[&input]),
            stream(&[frame(HEADERS, END_HEADERS, &want_block)])
        );
    }

    #[test]
    fn a_block_split_over_continuation_and_padding_is_rewritten_in_place() {
        let block = grpc_core_block(b"a%2Fb.sock");
        let (one, two) = block.split_at(20);
        let mut padded = vec![3];
        padded.extend_from_slice(one);
        padded.extend_from_slice(&[0, 0, 0]);
        let input = stream(&[
            frame(HEADERS, PADDED, &padded),
            frame(CONTINUATION, END_HEADERS, two),
        ]);
        let out = run(&[&input]);
        assert_eq!(out.len(), input.len());
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("a-2Fb.sock") || text.contains("-2Fb.sock"),
            "{text}"
        );
        assert!(!text.contains('%'), "{text}");
    }

    #[test]
    fn huffman_values_and_garbage_pass_unchanged() {
        let huffman = [0x40, 10]
            .iter()
            .chain(b":authority")
            .chain(&[0x83, 0x25, 0x25, 0x25])
            .copied()
            .collect::<Vec<u8>>();
        let truncated = vec![0x40, 10, b':', b'a'];
        let lying = frame(HEADERS, END_HEADERS | PADDED, &[200, 1, 2]);
        for input in [
            stream(&[frame(HEADERS, END_HEADERS, &huffman)]),
            stream(&[frame(HEADERS, END_HEADERS, &truncated)]),
            stream(&[lying]),
            PREFACE[..10].to_vec(),
        ] {
            assert_eq!(run(&[&input]), input);
        }
    }

    #[test]
    fn a_header_block_over_the_limit_passes_unchanged() {
        let mut block = grpc_core_block(b"a%2Fb");
        block.resize(MAX_BLOCK, 0x82);
        let input = stream(&[frame(HEADERS, END_HEADERS, &block)]);
        assert_eq!(run(&[&input]), input);
    }
}

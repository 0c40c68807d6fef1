//! W3C trace context (`traceparent`): continue the caller's trace or start one, with a new span
//! id for the hop this sidecar adds.

use std::fmt;

/// A parsed or new trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceContext {
    /// 16-byte trace id.
    pub(crate) trace_id: [u8; 16],
    /// 8-byte id of the span this context points at (the parent of the next span).
    pub(crate) span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub(crate) flags: u8,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// Parses a `traceparent` value (version 00; unknown later versions are read by their
    /// first four fields, as the spec asks). All-zero ids are invalid.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = hex_bytes::<16>(trace)?;
        let span_id = hex_bytes::<8>(span)?;
        let [flags] = hex_bytes::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new sampled trace.
    pub(crate) fn start() -> Self {
        TraceContext {
            trace_id: nonzero(),
            span_id: nonzero(),
            flags: 1,
        }
    }

    /// The context for a child span of this one (same trace, new span id).
    pub(crate) fn child(&self) -> Self {
        TraceContext {
            span_id: nonzero(),
            ..*self
        }
    }
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut b = [0u8; N];
        rand::fill(&mut b[..]);
        if b != [0; N] {
            return b;
        }
    }
}

/// Lower-case hex digits of `b` into `out` (two per byte; `out` is `2 × b.len()` long).
fn hex_into(b: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (x, pair) in b.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(x >> 4)];
        pair[1] = DIGITS[usize::from(x & 0x0f)];
    }
}

/// Length of a version-00 `traceparent` value: `00-` 32 `-` 16 `-` 2.
const TRACEPARENT_LEN: usize = 55;

impl TraceContext {
    /// This context as a version-00 `traceparent` value (W3C Trace Context §3.2), ASCII, with
    /// no allocation: it is made for every request that crosses the sidecar.
    pub(crate) fn encode(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..55]);
        out
    }

    /// [`encode`](Self::encode) as a header value.
    pub(crate) fn header_value(&self) -> http::HeaderValue {
        let bytes = self.encode();
        // Hex digits and dashes only: always a valid header value.
        http::HeaderValue::from_bytes(&bytes).unwrap_or(http::HeaderValue::from_static(""))
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.encode();
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let t = TraceContext::parse(PARENT).unwrap();
        assert_eq!(t.to_string(), PARENT);
        assert_eq!(t.header_value(), PARENT);
    }

    #[test]
    fn a_child_continues_the_trace_in_a_new_span() {
        let t = TraceContext::parse(PARENT).unwrap();
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
    }

    #[test]
    fn a_malformed_traceparent_is_refused() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_future_version_with_more_fields_is_accepted() {
        assert!(TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
    }

    #[test]
    fn a_started_trace_is_sampled() {
        assert_eq!(TraceContext::start().flags, 1);
    }
}

//! The Prometheus text exposition format (0.0.4), read back: what `halyard ctl top` and the demo
//! scrape from the sidecars' `/metrics`. Label values may hold escaped quotes, backslashes and
//! newlines, and commas or braces inside quotes; a sample may carry a timestamp after its value.

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` suffixes as written).
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses Prometheus text exposition; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = line.split_at(line.find(['{', ' '])?);
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (Vec::new(), rest),
    };
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Labels up to the closing brace; returns them and the text after the brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let (value, rest) = unescape_until_quote(rest)?;
        labels.push((key.to_owned(), value));
        s = rest;
    }
}

/// A label value up to its closing quote, unescaped; returns it and the text after the quote.
fn unescape_until_quote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Whether one outcome of an edge counts as a success, the same for every tool: an L7 request
/// whose `response_code` is not 5xx (a 4xx is the caller's doing, as in Istio's and Linkerd's
/// success rate), an L4 flow whose `response_flags` is `-` (completed). Anything else, or a
/// sample with neither label, is a failure.
pub(crate) fn succeeded(response_code: Option<&str>, response_flags: Option<&str>) -> bool {
    match (response_code, response_flags) {
        (Some(code), _) => !code.starts_with('5'),
        (None, Some(flags)) => flags == "-",
        _ => false,
    }
}

/// `histogram_quantile` (Prometheus) over cumulative buckets given as `(upper bound, count)` in
/// ascending bound order, the last one `+Inf`: linear interpolation inside the bucket that holds
/// the rank `q × total`; the largest finite bound when the rank falls in `+Inf`. `None` for an
/// empty histogram. `q` is in 0.0..=1.0; bounds in the histogram's unit (seconds here).
pub(crate) fn quantile(buckets: impl IntoIterator<Item = (f64, f64)>, q: f64) -> Option<f64> {
    let buckets: Vec<(f64, f64)> = buckets.into_iter().collect();
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let width = count - below;
            let within = if width > 0.0 {
                (rank - below) / width
            } else {
                1.0
            };
            return Some(lower + (le - lower) * within);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_fails_only_with_a_5xx() {
        assert!(succeeded(Some("404"), None));
        assert!(!succeeded(Some("503"), None));
    }

    #[test]
    fn a_flow_succeeds_only_without_flags() {
        assert!(succeeded(None, Some("-")));
        assert!(!succeeded(None, Some("UF")));
        assert!(!succeeded(None, None));
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket_of_the_rank() {
        let b = [(0.001, 50.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(b, 0.5), Some(0.001));
        let p75 = quantile(b, 0.75).unwrap();
        assert!((p75 - 0.0015).abs() < 1e-12, "{p75}");
    }

    #[test]
    fn quantile_in_the_inf_bucket_is_the_largest_finite_bound() {
        let b = [(0.001, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(b, 0.99), Some(0.001));
        assert_eq!(quantile([], 0.5), None);
    }

    #[test]
    fn parses_labels_with_escapes() {
        let s = parse("m{a=\"x\\\"y,z\",b=\"2\"} 3.5\nbad line\n# c\nn 1");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label("a"), Some("x\"y,z"));
        assert_eq!(s[0].label("b"), Some("2"));
        assert_eq!(s[0].value, 3.5);
        assert_eq!(s[1].name, "n");
    }

    /// A sample with escapes in its labels and a timestamp, then a plain one in exponent form.
    fn escaped_then_plain() -> Vec<Sample> {
        parse("m{a=\"1\\n2\",b=\"}{\\\\\"} 7 1700000000000\nplain 2.5e3")
    }

    #[test]
    fn parses_escapes_in_label_values() {
        let s = escaped_then_plain();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label("a"), Some("1\n2"));
        assert_eq!(s[0].label("b"), Some("}{\\"));
    }

    #[test]
    fn a_timestamp_is_not_the_value() {
        let s = escaped_then_plain();
        assert_eq!(s[0].value, 7.0, "the timestamp is not the value");
    }

    #[test]
    fn parses_a_plain_sample_in_exponent_form() {
        let s = escaped_then_plain();
        assert_eq!(s[1].label("a"), None);
        assert_eq!(s[1].value, 2500.0);
    }

    #[test]
    fn a_broken_line_is_no_sample() {
        assert!(parse_line("broken{x=\"1 2").is_none());
        assert!(parse_line("novalue").is_none());
    }
}

//! Reading `/metrics`: [`parse_prometheus`] turns Prometheus or OpenMetrics text into
//! [`Sample`]s and [`metric_value`] sums the ones a test asks for.
//!
//! A small parser of our own rather than a crate: `prometheus-parse` splits labels on
//! `,` and `=` without regard to quoting or escapes (a fix has waited unmerged since
//! 2024), and `openmetrics-parser` is LGPL-3.0 where this workspace is Apache-2.0.
//! The tests below pin it to the shape sluice's exposition (prometheus-client) has.

use std::collections::BTreeMap;

/// One Prometheus sample line.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sample's name as written (`sluice_decisions_total`, `..._bucket`).
    pub name: String,
    /// Its labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Its value (`+Inf` and `-Inf` included).
    pub value: f64,
}

/// Loose parser for Prometheus / OpenMetrics text: ignores comments, reads
/// `name{a="b",c="d"} value [timestamp]`. Label order does not matter.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = if let Some(open) = line.find('{') {
            let Some(close) = line.rfind('}') else {
                continue;
            };
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        } else {
            let mut it = line.splitn(2, char::is_whitespace);
            let name = it.next().unwrap_or("");
            (name, BTreeMap::new(), it.next().unwrap_or(""))
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.push(Sample {
            name: name.trim().to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let key = s[start..i].trim().to_string();
        i += 1; // '='
        if i >= b.len() || b[i] != b'"' {
            break;
        }
        i += 1;
        let mut val = String::new();
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' && i + 1 < b.len() {
                i += 1;
                val.push(match b[i] {
                    b'n' => '\n',
                    c => c as char,
                });
            } else {
                // labels here are ASCII; keep multi-byte text intact anyway
                let ch = s[i..].chars().next().unwrap();
                val.push(ch);
                i += ch.len_utf8() - 1;
            }
            i += 1;
        }
        i += 1; // closing quote
        m.insert(key, val);
    }
    m
}

/// Sum of the samples named `name` whose labels include all of `labels`.
pub fn metric_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in samples.iter().filter(|s| s.name == name) {
        if labels
            .iter()
            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape prometheus-client gives sluice's `/metrics` (OpenMetrics text).
    const EXPOSITION: &str = r#"# HELP sluice_decisions Decisions by limit and outcome.
# TYPE sluice_decisions counter
sluice_decisions_total{limit="chat_user",outcome="allowed"} 5
sluice_decisions_total{limit="chat_user",outcome="denied"} 1
sluice_decisions_total{limit="five",outcome="denied"} 1
# HELP sluice_store_keys Counters the store holds.
# TYPE sluice_store_keys gauge
sluice_store_keys{backend="memory"} 3
# HELP sluice_degraded_decisions Decisions made without the shared store.
# TYPE sluice_degraded_decisions counter
sluice_degraded_decisions_total 0
# HELP sluice_store_latency_seconds Store call latency.
# TYPE sluice_store_latency_seconds histogram
# UNIT sluice_store_latency_seconds seconds
sluice_store_latency_seconds_sum 0.25
sluice_store_latency_seconds_count 7
sluice_store_latency_seconds_bucket{le="0.001"} 2
sluice_store_latency_seconds_bucket{le="+Inf"} 7
# EOF
"#;

    #[test]
    fn reads_names_labels_and_values_and_skips_comments() {
        let samples = parse_prometheus(EXPOSITION);
        assert_eq!(samples.len(), 9, "{samples:?}");
        let first = &samples[0];
        assert_eq!(first.name, "sluice_decisions_total");
        assert_eq!(first.labels["limit"], "chat_user");
        assert_eq!(first.labels["outcome"], "allowed");
        assert_eq!(first.value, 5.0);
        let inf = samples.last().expect("a sample");
        assert_eq!(inf.labels["le"], "+Inf");
        assert_eq!(inf.value, 7.0);
    }

    #[test]
    fn metric_value_sums_the_samples_whose_labels_include_the_asked_ones() {
        let samples = parse_prometheus(EXPOSITION);
        let decisions =
            |labels: &[(&str, &str)]| metric_value(&samples, "sluice_decisions_total", labels);
        assert_eq!(decisions(&[("limit", "chat_user")]), Some(6.0));
        assert_eq!(
            decisions(&[("limit", "chat_user"), ("outcome", "denied")]),
            Some(1.0)
        );
        assert_eq!(decisions(&[("limit", "nobody")]), None, "absent, not 0");
        assert_eq!(
            metric_value(&samples, "sluice_degraded_decisions_total", &[]),
            Some(0.0)
        );
        assert_eq!(metric_value(&samples, "sluice_store_keys", &[]), Some(3.0));
    }

    #[test]
    fn label_values_keep_commas_equals_braces_escapes_and_utf8() {
        let samples = parse_prometheus(
            "m{a=\"x,y=z\",b=\"say \\\"hi\\\"\\\\ {ok}\",c=\"line\\nnext\",d=\"caf\u{e9}\"} 1.5 1700000000\n",
        );
        assert_eq!(samples.len(), 1, "{samples:?}");
        let labels = &samples[0].labels;
        assert_eq!(labels["a"], "x,y=z");
        assert_eq!(labels["b"], "say \"hi\"\\ {ok}");
        assert_eq!(labels["c"], "line\nnext");
        assert_eq!(labels["d"], "caf\u{e9}");
        assert_eq!(samples[0].value, 1.5, "the timestamp is not the value");
    }

    #[test]
    fn infinities_parse_and_unreadable_values_are_skipped() {
        let samples = parse_prometheus("a +Inf\nb -Inf\nc NaN\nd not-a-number\n");
        let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(samples[0].value, f64::INFINITY);
        assert_eq!(samples[1].value, f64::NEG_INFINITY);
        assert!(samples[2].value.is_nan());
    }
}

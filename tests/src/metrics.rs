//! Reading a `GET /metrics` answer: Prometheus's text format, as far as
//! the services write it (no escaped quotes in label values, no
//! timestamps).

use std::collections::BTreeMap;

use anyhow::{bail, Context};

/// One sample: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' name (`http_requests_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// In the order written.
    pub samples: Vec<Sample>,
    /// The text as answered.
    pub text: String,
}

impl Scrape {
    /// Parses a scrape.
    ///
    /// # Errors
    /// A line that is not a comment and not `name{labels} value`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("no value: {line}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().with_context(|| format!("bad value: {line}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .with_context(|| format!("unclosed labels: {line}"))?;
                    (name, labels_of(inner).with_context(|| line.to_owned())?)
                }
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Ok(Self {
            samples,
            text: text.to_owned(),
        })
    }

    /// The sum of the samples named `name` whose labels include `labels`
    /// (0 when there is none: a counter not yet touched is not written).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether some sample is named `name` and has `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    /// Every value the label `label` takes in samples named `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect();
        values.sort();
        values.dedup();
        values
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
    }
}

fn labels_of(inner: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("a label without =\"")?;
        let (value, after) = after.split_once('"').context("an unclosed label value")?;
        labels.insert(key.to_owned(), value.to_owned());
        rest = after.strip_prefix(',').unwrap_or(after);
        if !after.is_empty() && !after.starts_with(',') {
            bail!("labels not separated by commas");
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_histograms_and_bare_gauges() -> anyhow::Result<()> {
        let scrape = Scrape::parse(
            "# TYPE http_requests_total counter\n\
             http_requests_total{method=\"GET\",route=\"/shows/{id}\",status=\"404\"} 2\n\
             http_requests_total{method=\"GET\",route=\"(no route)\",status=\"404\"} 1\n\
             http_request_duration_seconds_bucket{method=\"GET\",le=\"+Inf\"} 3\n\
             sse_subscribers 4\n",
        )?;
        assert_eq!(scrape.sum("http_requests_total", &[("status", "404")]), 3.0);
        assert_eq!(
            scrape.sum("http_requests_total", &[("route", "/shows/{id}")]),
            2.0
        );
        assert!(scrape.has("http_request_duration_seconds_bucket", &[("le", "+Inf")]));
        assert_eq!(scrape.sum("sse_subscribers", &[]), 4.0);
        assert_eq!(scrape.sum("bookings_total", &[]), 0.0);
        assert_eq!(
            scrape.label_values("http_requests_total", "route"),
            ["(no route)", "/shows/{id}"]
        );
        assert!(Scrape::parse("broken{a=\"b\" 1").is_err());
        assert!(Scrape::parse("no_value").is_err());
        Ok(())
    }
}

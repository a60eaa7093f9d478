//! Scraping a relay's Prometheus endpoint, and comparing two scrapes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// One scrape: series (`name{labels}`) → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Every sample line.
    pub series: BTreeMap<String, f64>,
}

impl Scrape {
    /// One series' value (0 when absent).
    pub fn get(&self, series: &str) -> f64 {
        self.series.get(series).copied().unwrap_or(0.0)
    }

    /// The sum over a family's series (every label value).
    pub fn sum(&self, family: &str) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(family))
            .map(|(_, v)| v)
            .sum()
    }

    /// Parses the Prometheus text format.
    pub fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect();
        Scrape { series }
    }

    /// `after - before` for every series in `after`.
    pub fn delta(before: &Scrape, after: &Scrape) -> Scrape {
        let series = after
            .series
            .iter()
            .map(|(k, v)| (k.clone(), v - before.get(k)))
            .collect();
        Scrape { series }
    }
}

/// Scrapes every comma-separated URL and sums the series: a cluster's
/// relays counted as one.
pub fn scrape_all(urls: &str) -> Result<Scrape, String> {
    let mut total = Scrape::default();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        for (k, v) in scrape(url)?.series {
            *total.series.entry(k).or_insert(0.0) += v;
        }
    }
    Ok(total)
}

/// GETs `url` (`http://host:port/path`) with a plain HTTP/1.0 request.
pub fn scrape(url: &str) -> Result<Scrape, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    let timeout = Duration::from_secs(5);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")
        .map_err(|e| format!("{url}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("{url}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP response"))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200") {
        return Err(format!("{url}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(Scrape::parse(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_subtracts() {
        let a = Scrape::parse("# HELP x y\nx_total{k=\"a\"} 1\nx_total{k=\"b\"} 2\ng 5\n");
        let b = Scrape::parse("x_total{k=\"a\"} 4\nx_total{k=\"b\"} 2\ng 3\n");
        assert_eq!(a.sum("x_total"), 3.0);
        let d = Scrape::delta(&a, &b);
        assert_eq!(d.get("x_total{k=\"a\"}"), 3.0);
        assert_eq!(d.get("g"), -2.0);
        assert_eq!(d.get("missing"), 0.0);
    }
}

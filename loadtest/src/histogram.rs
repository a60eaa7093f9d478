//! Latency histograms: their shape, and their lossless form in a report
//! (HdrHistogram's compressed V2 encoding in base64, as its other tools
//! read), so that `loadtest merge` recomputes percentiles over several
//! load machines from the histograms themselves.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

/// An empty latency histogram: 1 µs .. 100 s in nanoseconds, 3
/// significant digits.
pub fn latency() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// `h` compressed (V2 + deflate) and in base64.
pub fn encode(h: &Histogram<u64>) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| format!("encode the latency histogram: {e:?}"))?;
    Ok(STANDARD.encode(bytes))
}

/// The histogram [`encode`] wrote.
pub fn decode(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64 ({e})"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("not an HdrHistogram V2 encoding ({e:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_losslessly() {
        let mut h = latency();
        for v in [1_000u64, 25_000, 25_000, 7_000_000, 90_000_000_000] {
            h.record(v).unwrap();
        }
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(decode("not base64!").is_err());
        assert!(decode("aGVsbG8=").is_err());
    }
}

//! Text for people: numbers with thousands separators, durations in µs, ms
//! or s, sizes in MiB, and escaping for the SVG plot. Every report of the
//! sim (the swarm's, `bench core`, `bench core --replicas`, `bench e2e`)
//! formats its figures with these, so the same figure reads the same way
//! everywhere. Nothing here measures or decides anything.

use std::time::Duration;

/// 1234567 → "1,234,567".
pub fn thousands(value: u64) -> String {
    thousands_u128(u128::from(value))
}

/// [`thousands`] for counts that may exceed `u64` (sums of byte counts).
pub fn thousands_u128(value: u128) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Microseconds for people: "850 µs", "1.25 ms", "2.10 s".
pub fn duration_text(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.2} ms", micros as f64 / 1e3)
    } else {
        format!("{:.2} s", micros as f64 / 1e6)
    }
}

/// Microseconds as the benchmarks' tables print them: whole µs below
/// 10 ms ("9999 µs"), else ms with one decimal ("12.5 ms").
pub fn micros(value: u64) -> String {
    if value >= 10_000 {
        format!("{:.1} ms", value as f64 / 1_000.0)
    } else {
        format!("{value} µs")
    }
}

/// Whole milliseconds, or "-" for a duration that was not measured.
pub fn millis(value: Option<Duration>) -> String {
    value.map_or("-".into(), |value| format!("{} ms", value.as_millis()))
}

/// Bytes in a MiB.
pub const MIB: f64 = 1024.0 * 1024.0;

/// Bytes in MiB with one decimal: "1.5 MiB".
pub fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

/// One decimal, without a trailing ".0": 2.0 → "2", 2.5 → "2.5".
pub fn trim_number(value: f64) -> String {
    let text = format!("{value:.1}");
    text.strip_suffix(".0").map_or(text.clone(), str::to_owned)
}

/// `text` safe inside SVG (XML) text and attributes.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits_by_three() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(
            thousands_u128(u128::from(u64::MAX) * 10),
            "184,467,440,737,095,516,150"
        );
    }

    #[test]
    fn durations_switch_unit_at_each_thousand() {
        assert_eq!(duration_text(850), "850 µs");
        assert_eq!(duration_text(1_250), "1.25 ms");
        assert_eq!(duration_text(2_100_000), "2.10 s");
        assert_eq!(micros(9_999), "9999 µs");
        assert_eq!(micros(12_500), "12.5 ms");
        assert_eq!(millis(Some(Duration::from_micros(1_999))), "1 ms");
        assert_eq!(millis(None), "-");
    }

    #[test]
    fn sizes_numbers_and_markup() {
        assert_eq!(mebibytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(trim_number(2.0), "2");
        assert_eq!(trim_number(2.5), "2.5");
        assert_eq!(escape("a<b & c>d"), "a&lt;b &amp; c&gt;d");
    }
}

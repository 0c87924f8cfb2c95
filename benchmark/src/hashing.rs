//! The routing hashes under test: sticky-session's `int31` (with JavaScript number semantics reproduced)
//! and our `djb2` (npm string-hash), plus the random addresses and evenness figures of the hash benchmark.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// 2^31: sticky-session reduces with `% 2147483648` after every addition.
const TWO_POW_31: i64 = 2_147_483_648;

/// One mixing round of sticky-session's hash, as JavaScript evaluates it: `%` keeps the dividend's sign,
/// `<<` and `>>` work on int32, and a NaN part (an unparsable text part) leaves the state at 0.
fn int31_round(state: i64, part: Option<i64>) -> i64 {
    let Some(part) = part else {
        // r += NaN makes r NaN; NaN % m and NaN + (NaN << 10) stay NaN; `r ^= r >> 6` turns it into 0.
        return 0;
    };
    let mut r = (state + part) % TWO_POW_31;
    r += i64::from((r as i32).wrapping_shl(10));
    r %= TWO_POW_31;
    let r32 = r as i32;
    i64::from(r32 ^ (r32 >> 6))
}

/// sticky-session's finalisation: `hash += hash << 3 … hash >>> 0`.
fn int31_finish(state: i64) -> u32 {
    let mut hash = state;
    hash += i64::from((hash as i32).wrapping_shl(3));
    hash %= TWO_POW_31;
    let h32 = hash as i32;
    hash = i64::from(h32 ^ (h32 >> 11));
    hash += i64::from((hash as i32).wrapping_shl(15));
    hash %= TWO_POW_31;
    (hash as i32) as u32
}

/// sticky-session's `Master.prototype.hash` over numeric parts, starting from `seed` (an int32 in JS).
/// `None` stands for a part that `parseInt` could not read (NaN).
pub fn int31_hash(parts: impl IntoIterator<Item = Option<i64>>, seed: i32) -> u32 {
    int31_finish(parts.into_iter().fold(i64::from(seed), int31_round))
}

/// The npm sticky-cluster benchmark's `int31`: the address text split on `.`, each part through `parseInt(part, 10)`.
/// IPv6 text has no dots, so the whole address becomes one part: its leading decimal digits, or NaN.
pub fn int31_text(text: &str, seed: i32) -> u32 {
    int31_hash(text.split('.').map(parse_int_prefix), seed)
}

/// sticky-session's master proper: the hash over the address bytes (`ip.toBuffer(remoteAddress)`).
pub fn int31_bytes(ip: IpAddr, seed: i32) -> u32 {
    match ip {
        IpAddr::V4(v4) => int31_hash(v4.octets().map(|b| Some(i64::from(b))), seed),
        IpAddr::V6(v6) => int31_hash(v6.octets().map(|b| Some(i64::from(b))), seed),
    }
}

/// JavaScript `parseInt(text, 10)`: optional whitespace and sign, then the longest run of decimal digits.
pub fn parse_int_prefix(text: &str) -> Option<i64> {
    let text = text.trim_start();
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let run: &str = &digits[..digits.bytes().take_while(u8::is_ascii_digit).count()];
    if run.is_empty() {
        return None;
    }
    // Address parts are short; saturate rather than overflow on absurd input.
    let value = run.parse::<i64>().unwrap_or(i64::MAX / 4);
    Some(if negative { -value } else { value })
}

/// npm string-hash over ASCII bytes: the same result as `sticky_cluster::hash::string_hash` for address
/// text (always ASCII) without collecting UTF-16 units first.
pub fn djb2_ascii(text: &str) -> u32 {
    text.bytes().rev().fold(5381u32, |hash, byte| hash.wrapping_mul(33) ^ u32::from(byte))
}

/// A small deterministic generator (splitmix64): reproducible address sets from a seed, no dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `count` random addresses, odd positions IPv4 and even ones IPv6, as the npm benchmark's
/// `(i % 2) ? chance.ip() : chance.ipv6()` loop does.
pub fn random_addresses(count: usize, seed: u64) -> Vec<IpAddr> {
    let mut random = SplitMix64::new(seed);
    (0..count)
        .map(|i| {
            let bits = random.next_u64();
            if i % 2 == 1 {
                IpAddr::V4(Ipv4Addr::from((bits >> 32) as u32))
            } else {
                let low = random.next_u64();
                IpAddr::V6(Ipv6Addr::from((u128::from(bits) << 64) | u128::from(low)))
            }
        })
        .collect()
}

/// How evenly a hash spread the addresses over the buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Evenness {
    /// Fullest bucket divided by emptiest one (infinite when a bucket is empty).
    pub max_over_min: f64,
    /// Pearson's chi-square against the uniform spread; about `buckets - 1` for a good hash.
    pub chi_square: f64,
    /// Degrees of freedom of the chi-square: buckets - 1.
    pub degrees_of_freedom: usize,
}

/// Evenness of a scatter (bucket counts).
pub fn evenness(scatter: &[u64]) -> Evenness {
    let total: u64 = scatter.iter().sum();
    let expected = total as f64 / scatter.len().max(1) as f64;
    let chi_square =
        if expected > 0.0 { scatter.iter().map(|&n| (n as f64 - expected).powi(2) / expected).sum() } else { 0.0 };
    let max = scatter.iter().copied().max().unwrap_or(0);
    let min = scatter.iter().copied().min().unwrap_or(0);
    let max_over_min = if min == 0 { f64::INFINITY } else { max as f64 / min as f64 };
    Evenness { max_over_min, chi_square, degrees_of_freedom: scatter.len().saturating_sub(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_int_reads_the_leading_digits_like_javascript() {
        assert_eq!(parse_int_prefix("192"), Some(192));
        assert_eq!(parse_int_prefix("2001:db8::1"), Some(2001));
        assert_eq!(parse_int_prefix("::ffff:1"), None);
        assert_eq!(parse_int_prefix("fe80::1"), None);
        assert_eq!(parse_int_prefix(" -7x"), Some(-7));
    }

    #[test]
    fn random_addresses_alternate_families_and_repeat_for_a_seed() {
        let addresses = random_addresses(6, 7);
        assert!(addresses[0].is_ipv6() && addresses[1].is_ipv4() && addresses[4].is_ipv6());
        assert_eq!(addresses, random_addresses(6, 7));
        assert_ne!(addresses, random_addresses(6, 8));
    }

    #[test]
    fn evenness_of_a_flat_scatter_is_perfect() {
        let flat = evenness(&[10, 10, 10, 10]);
        assert_eq!(flat, Evenness { max_over_min: 1.0, chi_square: 0.0, degrees_of_freedom: 3 });
        let skewed = evenness(&[20, 0]);
        assert!(skewed.max_over_min.is_infinite());
        assert!((skewed.chi_square - 20.0).abs() < 1e-9);
    }
}

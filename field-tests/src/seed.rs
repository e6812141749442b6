//! Seeds for randomised scenarios: `CPIS_FIELD_SEED` replays a run, otherwise a fresh random
//! seed. Scenarios print the seed they used and name it in every failure message.

/// The environment variable that fixes the seed of every randomised scenario.
pub const SEED_ENV: &str = "CPIS_FIELD_SEED";

/// The seed from `CPIS_FIELD_SEED` (decimal or `0x` hex), or a random one.
pub fn pick() -> u64 {
    std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| parse(&s))
        .unwrap_or_else(rand::random)
}

fn parse(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_decimal_and_hex() {
        assert_eq!(super::parse("42"), Some(42));
        assert_eq!(super::parse(" 0x2a "), Some(42));
        assert_eq!(super::parse("x"), None);
    }
}

//! NHS number parsing against an independent brute-force check.

use cpis_protocol::{NhsNumber, NhsNumberError};
use proptest::prelude::*;

use crate::arb_nhs;

/// The DOMAIN.md rule, written out longhand and independently of the crate.
fn brute_force_valid(digits: &[u32; 10]) -> bool {
    let mut sum = 0;
    for (i, d) in digits.iter().take(9).enumerate() {
        sum += d * (10 - i as u32);
    }
    let check = 11 - (sum % 11);
    let check = if check == 11 { 0 } else { check };
    check != 10 && check == digits[9]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn agrees_with_brute_force(digits in prop::array::uniform10(0u32..10)) {
        let s: String = digits.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect();
        let parsed = s.parse::<NhsNumber>();
        prop_assert_eq!(parsed.is_ok(), brute_force_valid(&digits), "{}: {:?}", s, parsed);
        if let Err(e) = parsed {
            let check_failure = matches!(
                e,
                NhsNumberError::CheckValueTen | NhsNumberError::CheckDigitMismatch { .. }
            );
            prop_assert!(check_failure, "{}: {}", s, e);
        }
    }

    #[test]
    fn print_parse_round_trip(n in arb_nhs()) {
        let plain = n.to_string();
        prop_assert_eq!(plain.len(), 10);
        prop_assert_eq!(plain.parse::<NhsNumber>().unwrap(), n);
        prop_assert_eq!(n.spaced().parse::<NhsNumber>().unwrap(), n);
        prop_assert_eq!(n.spaced().replace(' ', "-").parse::<NhsNumber>().unwrap(), n);
        prop_assert_eq!(NhsNumber::from_u64(n.as_u64()).unwrap(), n);
        let json = serde_json::to_string(&n).unwrap();
        prop_assert_eq!(&json, &format!("\"{plain}\""));
        prop_assert_eq!(serde_json::from_str::<NhsNumber>(&json).unwrap(), n);
    }

    #[test]
    fn other_shapes_are_refused(s in "[0-9 \\-a-z]{0,14}") {
        let digits = s.chars().filter(char::is_ascii_digit).count();
        if let Ok(n) = s.parse::<NhsNumber>() {
            prop_assert_eq!(digits, 10);
            let t = s.trim();
            prop_assert!(t == n.to_string() || t == n.spaced() || t == n.spaced().replace(' ', "-"));
        }
    }
}

#[test]
fn every_valid_999_number_is_counted() {
    // The test range: 999 + six digits + check digit. 10/11 of the prefixes are valid.
    let valid = (0..1_000_000u32)
        .filter(|i| {
            let mut nine = [9u8; 9];
            let mut v = *i;
            for slot in nine[3..].iter_mut().rev() {
                *slot = (v % 10) as u8;
                v /= 10;
            }
            NhsNumber::complete(nine).is_some()
        })
        .count();
    assert!((900_000..920_000).contains(&valid), "{valid}");
}

//! The NHS number: parsing the three accepted forms, the modulus-11 check, printing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Weights applied to digits 1–9 when computing the check value.
const WEIGHTS: [u32; 9] = [10, 9, 8, 7, 6, 5, 4, 3, 2];

/// A valid ten-digit NHS number (check digit verified).
///
/// Accepted forms: `9434765919`, `943 476 5919`, `943-476-5919` (surrounding white space is
/// ignored). `Display` prints the ten digits with no separators.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NhsNumber(u64);

/// Why a string is not an NHS number. Each variant names one specific reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("NHS number is empty")]
    Empty,
    #[error("NHS number has a non-digit character {found:?} at position {position}")]
    NonDigit { found: char, position: usize },
    #[error("NHS number must have 10 digits, found {found}")]
    WrongLength { found: usize },
    #[error("NHS number separators must group it as 943 476 5919 or 943-476-5919")]
    BadGrouping,
    #[error("NHS number is invalid: its check value is 10, which no NHS number has")]
    CheckValueTen,
    #[error("NHS number check digit is {found}, expected {expected}")]
    CheckDigitMismatch { expected: u8, found: u8 },
}

impl NhsNumberError {
    /// A stable machine-readable code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "nhs_number_empty",
            Self::NonDigit { .. } => "nhs_number_non_digit",
            Self::WrongLength { .. } => "nhs_number_wrong_length",
            Self::BadGrouping => "nhs_number_bad_grouping",
            Self::CheckValueTen => "nhs_number_check_value_ten",
            Self::CheckDigitMismatch { .. } => "nhs_number_check_digit_mismatch",
        }
    }
}

/// The check digit for the first nine digits, or `None` when the check value is 10.
pub fn check_digit(first_nine: &[u8; 9]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(*d) * w)
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        v => Some(v as u8),
    }
}

impl NhsNumber {
    /// Builds a number from ten digit values, verifying the check digit.
    pub fn from_digits(digits: [u8; 10]) -> Result<Self, NhsNumberError> {
        if let Some((position, d)) = digits.iter().enumerate().find(|(_, d)| **d > 9) {
            return Err(NhsNumberError::NonDigit {
                found: char::from(b'0'.saturating_add(*d)),
                position: position + 1,
            });
        }
        let mut nine = [0u8; 9];
        nine.copy_from_slice(&digits[..9]);
        let expected = check_digit(&nine).ok_or(NhsNumberError::CheckValueTen)?;
        if expected != digits[9] {
            return Err(NhsNumberError::CheckDigitMismatch {
                expected,
                found: digits[9],
            });
        }
        Ok(Self(
            digits.iter().fold(0u64, |acc, d| acc * 10 + u64::from(*d)),
        ))
    }

    /// Completes nine leading digits with their check digit; `None` when the check value is 10.
    pub fn complete(first_nine: [u8; 9]) -> Option<Self> {
        let check = check_digit(&first_nine)?;
        let mut digits = [0u8; 10];
        digits[..9].copy_from_slice(&first_nine);
        digits[9] = check;
        Self::from_digits(digits).ok()
    }

    /// Builds a number from its integer value (as printed without separators).
    pub fn from_u64(value: u64) -> Result<Self, NhsNumberError> {
        if value > 9_999_999_999 {
            return Err(NhsNumberError::WrongLength {
                found: value.to_string().len(),
            });
        }
        let mut digits = [0u8; 10];
        let mut v = value;
        for slot in digits.iter_mut().rev() {
            *slot = (v % 10) as u8;
            v /= 10;
        }
        Self::from_digits(digits)
    }

    /// The number as an integer (leading zeros are implied by the ten-digit width).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The ten digits as ASCII bytes.
    pub fn to_ascii(self) -> [u8; 10] {
        let mut out = [b'0'; 10];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out
    }

    /// The number grouped for people to read: `943 476 5919`.
    pub fn spaced(self) -> String {
        let s = self.to_string();
        format!("{} {} {}", &s[..3], &s[3..6], &s[6..])
    }
}

impl FromStr for NhsNumber {
    type Err = NhsNumberError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(NhsNumberError::Empty);
        }
        let mut digits = Vec::with_capacity(10);
        let mut separators = Vec::new();
        for (i, ch) in s.chars().enumerate() {
            match ch {
                '0'..='9' => digits.push(ch as u8 - b'0'),
                ' ' | '-' => separators.push((i, ch)),
                _ => {
                    return Err(NhsNumberError::NonDigit {
                        found: ch,
                        position: i + 1,
                    });
                }
            }
        }
        if digits.len() != 10 {
            return Err(NhsNumberError::WrongLength {
                found: digits.len(),
            });
        }
        let grouped = match separators.as_slice() {
            [] => true,
            [(3, a), (7, b)] => a == b,
            _ => false,
        };
        if !grouped {
            return Err(NhsNumberError::BadGrouping);
        }
        let mut arr = [0u8; 10];
        arr.copy_from_slice(&digits);
        Self::from_digits(arr)
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}", self.0)
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NhsNumber({:010})", self.0)
    }
}

/// Human-readable formats (JSON) carry the ten-digit string; binary formats carry the integer.
impl Serialize for NhsNumber {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for NhsNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let v = u64::deserialize(deserializer)?;
            Self::from_u64(v).map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_forms() {
        for s in [
            "9434765919",
            "943 476 5919",
            "943-476-5919",
            " 9434765919\n",
        ] {
            let n: NhsNumber = s.parse().unwrap();
            assert_eq!(n.to_string(), "9434765919");
        }
        assert_eq!(
            "6541003238".parse::<NhsNumber>().unwrap().spaced(),
            "654 100 3238"
        );
    }

    #[test]
    fn names_the_reason() {
        use NhsNumberError::*;
        assert_eq!("".parse::<NhsNumber>(), Err(Empty));
        assert_eq!(
            "94347659x9".parse::<NhsNumber>(),
            Err(NonDigit {
                found: 'x',
                position: 9
            })
        );
        assert_eq!(
            "943476591".parse::<NhsNumber>(),
            Err(WrongLength { found: 9 })
        );
        assert_eq!(
            "94347659190".parse::<NhsNumber>(),
            Err(WrongLength { found: 11 })
        );
        assert_eq!("943 476-5919".parse::<NhsNumber>(), Err(BadGrouping));
        assert_eq!("9434 765919".parse::<NhsNumber>(), Err(BadGrouping));
        assert_eq!(
            "9434765918".parse::<NhsNumber>(),
            Err(CheckDigitMismatch {
                expected: 9,
                found: 8
            })
        );
        // 000000006x: sum = 6*4 = 24, 24 % 11 = 2, check value 9; find a check-value-10 case:
        // 000000010x: sum = 1*3 = 3, 11 - 3 = 8. 100000000x: sum = 10, 11 - 10 = 1.
        // 000000001x: sum = 2, 11 - 2 = 9. 000000100x: 4 -> 7. 000010000x: 6 -> 5.
        // 000000011x: 3 + 2 = 5 -> 6. 000000000x: 0 -> 11 -> 0. 010000000x: 9 -> 2.
        // 001000000x: 8 -> 3. 000000101x: 4 + 2 = 6 -> 5. 000000110x: 4 + 3 = 7 -> 4.
        // 000000111x: 9 -> 2. 000001000x: 5 -> 6. 100000001x: 10 + 2 = 12 % 11 = 1 -> 10.
        assert_eq!("1000000010".parse::<NhsNumber>(), Err(CheckValueTen));
    }

    #[test]
    fn check_value_eleven_means_zero() {
        assert!("0000000000".parse::<NhsNumber>().is_ok());
    }
}

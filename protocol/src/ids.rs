//! Typed identifiers: councils, regions, trusts, devices, events and plan types.
//!
//! Each validates in `FromStr` and prints in `Display`; raw strings stop at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: String,
}

/// Checks a short upper-case alphanumeric code (ODS-style).
fn check_code(
    kind: &'static str,
    value: &str,
    min: usize,
    max: usize,
    extra: &[char],
) -> Result<String, IdError> {
    let err = |reason: String| IdError {
        kind,
        value: value.to_owned(),
        reason,
    };
    if value.len() < min || value.len() > max {
        return Err(err(format!("must be {min} to {max} characters")));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || extra.contains(&c))
    {
        return Err(err(if extra.is_empty() {
            "may hold only upper-case letters A-Z and digits".to_owned()
        } else {
            "may hold only upper-case letters A-Z, digits and hyphens".to_owned()
        }));
    }
    Ok(value.to_owned())
}

macro_rules! code_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $min:literal, $max:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        // Written as the string it holds (as `into = "String"` would, without a copy: a
        // snapshot encodes 200,000 council codes).
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl $name {
            /// The code as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                check_code($kind, s.trim(), $min, $max, $extra).map(Self)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

code_type!(
    /// A council's organisation (ODS) code, e.g. `E08000026` or `425`: 3 to 9 upper-case
    /// letters and digits.
    CouncilCode,
    "council code",
    3,
    9,
    &[]
);
code_type!(
    /// An ambulance region's id, e.g. `EM`: 2 to 16 upper-case letters, digits or hyphens.
    RegionId,
    "region id",
    2,
    16,
    &['-']
);
code_type!(
    /// An ambulance trust's ODS code, e.g. `RX9`: 3 to 5 upper-case letters and digits.
    TrustCode,
    "trust code",
    3,
    5,
    &[]
);

macro_rules! uuid_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "Uuid", into = "Uuid")]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl TryFrom<Uuid> for $name {
            type Error = IdError;
            fn try_from(u: Uuid) -> Result<Self, IdError> {
                if u.get_version_num() != 7 {
                    return Err(IdError {
                        kind: $kind,
                        value: u.to_string(),
                        reason: "must be a UUID version 7".to_owned(),
                    });
                }
                Ok(Self(u))
            }
        }

        impl From<$name> for Uuid {
            fn from(v: $name) -> Uuid {
                v.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let u = Uuid::parse_str(s.trim()).map_err(|_| IdError {
                    kind: $kind,
                    value: s.to_owned(),
                    reason: "must be a UUID such as 01936f0e-8c3a-7d52-9f1e-3b2a1c0d4e5f"
                        .to_owned(),
                })?;
                Self::try_from(u)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }
    };
}

uuid_type!(
    /// A tablet's id, issued by the server at enrolment (UUID v7).
    DeviceId,
    "device id"
);
uuid_type!(
    /// An access event's id, made on the tablet when the lookup happens (UUID v7).
    EventId,
    "event id"
);

/// The kind of plan a flag records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PlanType {
    /// Child protection plan.
    #[serde(rename = "CPP")]
    Cpp,
    /// Looked-after child.
    #[serde(rename = "LAC")]
    Lac,
    /// Unborn child protection plan, held against the pregnant woman's NHS number.
    #[serde(rename = "UCPP")]
    Ucpp,
}

impl PlanType {
    /// Every plan type, in display order.
    pub const ALL: [PlanType; 3] = [PlanType::Cpp, PlanType::Lac, PlanType::Ucpp];

    /// The code used in files and APIs: `CPP`, `LAC` or `UCPP`.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanType::Cpp => "CPP",
            PlanType::Lac => "LAC",
            PlanType::Ucpp => "UCPP",
        }
    }

    /// What the code means, for people.
    pub fn description(self) -> &'static str {
        match self {
            PlanType::Cpp => "child protection plan",
            PlanType::Lac => "looked-after child",
            PlanType::Ucpp => "unborn child protection plan",
        }
    }
}

impl FromStr for PlanType {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s.trim().to_ascii_uppercase().as_str() {
            "CPP" => Ok(PlanType::Cpp),
            "LAC" => Ok(PlanType::Lac),
            "UCPP" => Ok(PlanType::Ucpp),
            _ => Err(IdError {
                kind: "plan type",
                value: s.to_owned(),
                reason: "must be CPP, LAC or UCPP".to_owned(),
            }),
        }
    }
}

impl fmt::Display for PlanType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_validate() {
        assert_eq!(
            "E08000026".parse::<CouncilCode>().unwrap().as_str(),
            "E08000026"
        );
        assert!("e08".parse::<CouncilCode>().is_err());
        assert!("AB".parse::<CouncilCode>().is_err());
        assert_eq!("EM".parse::<RegionId>().unwrap().to_string(), "EM");
        assert!("E M".parse::<RegionId>().is_err());
        assert!("RX9".parse::<TrustCode>().is_ok());
        assert!("RX9RX9".parse::<TrustCode>().is_err());
    }

    #[test]
    fn event_ids_are_v7() {
        let id = EventId::new();
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let v4 = "550e8400-e29b-41d4-a716-446655440000";
        let err = v4.parse::<EventId>().unwrap_err();
        assert_eq!(err.reason, "must be a UUID version 7");
    }

    #[test]
    fn plan_types_round_trip() {
        for p in PlanType::ALL {
            assert_eq!(p.as_str().parse::<PlanType>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        assert_eq!("lac".parse::<PlanType>().unwrap(), PlanType::Lac);
        assert!("CIN".parse::<PlanType>().is_err());
    }
}

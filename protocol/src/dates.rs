//! Serde helpers for dates: `YYYY-MM-DD` in human-readable formats, a day number in binary
//! ones, so signed bodies stay compact and their encoding deterministic.

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Deserializer, Serializer};

fn from_days<E: serde::de::Error>(days: i32) -> Result<NaiveDate, E> {
    NaiveDate::from_num_days_from_ce_opt(days)
        .ok_or_else(|| E::custom(format!("day number {days} is out of range")))
}

/// A required date.
pub mod date {
    use super::*;

    pub fn serialize<S: Serializer>(d: &NaiveDate, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(&d.format("%Y-%m-%d"))
        } else {
            s.serialize_i32(d.num_days_from_ce())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveDate, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            NaiveDate::parse_from_str(&s, "%Y-%m-%d").map_err(serde::de::Error::custom)
        } else {
            from_days(i32::deserialize(d)?)
        }
    }
}

/// An optional date.
pub mod opt_date {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<NaiveDate>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&Wrap(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NaiveDate>, D::Error> {
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }

    struct Wrap(NaiveDate);

    impl serde::Serialize for Wrap {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::date::serialize(&self.0, s)
        }
    }

    impl<'de> Deserialize<'de> for Wrap {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::date::deserialize(d).map(Wrap)
        }
    }
}

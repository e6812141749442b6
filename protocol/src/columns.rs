//! The columnar snapshot body (body format 3): the flags of a [`SnapshotBody`] stored column
//! by column, so that zstd sees like next to like.
//!
//! Row by row (format 2), each flag interleaves a council code, an NHS number, dates and a
//! case id, and zstd finds little to share between neighbours. Here:
//!
//! * the flags' council codes are a small dictionary, and the flags carry runs of its index
//!   (the server sends flags in council order, so a region of 12 councils has 12 runs);
//! * NHS numbers drop their check digit (it follows from the first nine) and are sent as the
//!   difference from the previous flag's (small, since the server sends them in order);
//! * one byte per flag holds the plan type and which optional fields are present, or repeat
//!   the previous flag's (a subject with two plans has one date of birth and one case id);
//! * dates are day differences (start from the earliest start, end and date of birth from
//!   the flag's start), and case ids are split into a prefix from a dictionary and up to
//!   nine trailing digits;
//! * every number column is stored as little-endian `u32`s split into byte planes (all the
//!   low bytes, then the next, ...), so the mostly-zero high bytes cost nearly nothing.
//!
//! The encoding is lossless for any [`SnapshotBody`] (any order, any strings) and
//! deterministic. Decoding checks every column's length against the flags it describes and
//! refuses anything left over; it never allocates more than the (size-capped) input implies.

use std::borrow::Borrow;

use chrono::{Datelike as _, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::contacts::SubjectContacts;
use crate::feed::SnapshotBody;
use crate::flag::{CouncilInfo, FlagRecord};
use crate::ids::{CouncilCode, PlanType};
use crate::nhs::NhsNumber;

/// Body format of the columnar snapshot.
pub const COLUMNS_FORMAT: u16 = 3;

const PLAN_MASK: u8 = 0b11;
const HAS_END: u8 = 1 << 2;
const HAS_DOB: u8 = 1 << 3;
const HAS_LOCAL_ID: u8 = 1 << 4;
/// The date of birth is the previous flag's (only with [`HAS_DOB`]).
const SAME_DOB: u8 = 1 << 5;
/// The case id is the previous flag's (only with [`HAS_LOCAL_ID`]).
const SAME_LOCAL_ID: u8 = 1 << 6;
const KNOWN_BITS: u8 = PLAN_MASK | HAS_END | HAS_DOB | HAS_LOCAL_ID | SAME_DOB | SAME_LOCAL_ID;

/// Trailing digits of a case id carried as a number (at most nine fit a `u32`).
const MAX_ID_DIGITS: usize = 9;

/// The wire form (postcard; then zstd as every body).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Columns {
    councils: Vec<CouncilInfo>,
    contacts: Vec<SubjectContacts>,
    /// The flags' council codes, in order of first appearance.
    codes: Vec<CouncilCode>,
    /// Runs of flags of one council: (index into `codes`, number of flags).
    council_runs: Vec<(u32, u32)>,
    /// One byte per flag: plan type and the presence bits above.
    kinds: Vec<u8>,
    /// Per flag: zigzag difference of the NHS number's first nine digits from the previous.
    nhs: Vec<u8>,
    /// The earliest start date, as a day number from the common era.
    start_base: i32,
    /// Per flag: start date minus `start_base`, in days.
    start: Vec<u8>,
    /// Per flag with an end date: zigzag(end - start) in days.
    end: Vec<u8>,
    /// Per flag with its own date of birth: zigzag(start - date of birth) in days.
    dob: Vec<u8>,
    /// Case id prefixes (what precedes the trailing digits), in order of first appearance.
    prefixes: Vec<String>,
    /// Per flag with its own case id: index into `prefixes`.
    id_prefix: Vec<u32>,
    /// Per flag with its own case id: how many trailing digits it has (0 to 9).
    id_digits: Vec<u8>,
    /// Per flag with its own case id: the trailing digits' value.
    id_value: Vec<u8>,
}

/// Encodes a snapshot body into its columnar wire form (before compression).
pub(crate) fn encode(body: &SnapshotBody) -> Result<Vec<u8>, String> {
    let mut c = Columns {
        councils: body.councils.clone(),
        contacts: body.contacts.clone(),
        start_base: body
            .flags
            .iter()
            .map(|f| f.start_date.num_days_from_ce())
            .min()
            .unwrap_or(0),
        ..Columns::default()
    };
    let n = body.flags.len();
    c.kinds.reserve(n);
    let (mut nhs, mut start) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut end, mut dob, mut id_value) = (Vec::new(), Vec::new(), Vec::new());
    let mut prev_nine = 0i64;
    let mut prev: Option<&FlagRecord> = None;
    for f in &body.flags {
        let code = index_of(&mut c.codes, &f.council);
        match c.council_runs.last_mut() {
            Some((i, len)) if *i == code => *len += 1,
            _ => c.council_runs.push((code, 1)),
        }
        let nine = (f.nhs_number.as_u64() / 10) as i64;
        nhs.push(zigzag(nine - prev_nine)?);
        prev_nine = nine;
        let s = f.start_date.num_days_from_ce();
        start.push(u32::try_from(i64::from(s) - i64::from(c.start_base)).map_err(|_| "start")?);

        let mut kind = match f.plan_type {
            PlanType::Cpp => 0,
            PlanType::Lac => 1,
            PlanType::Ucpp => 2,
        };
        if let Some(e) = f.end_date {
            kind |= HAS_END;
            end.push(zigzag(i64::from(e.num_days_from_ce()) - i64::from(s))?);
        }
        if let Some(d) = f.date_of_birth {
            kind |= HAS_DOB;
            if prev.and_then(|p| p.date_of_birth) == Some(d) {
                kind |= SAME_DOB;
            } else {
                dob.push(zigzag(i64::from(s) - i64::from(d.num_days_from_ce()))?);
            }
        }
        if let Some(id) = &f.local_id {
            kind |= HAS_LOCAL_ID;
            if prev.and_then(|p| p.local_id.as_ref()) == Some(id) {
                kind |= SAME_LOCAL_ID;
            } else {
                let (prefix, digits) = split_id(id);
                c.id_prefix.push(index_of(&mut c.prefixes, prefix));
                c.id_digits.push(digits.len() as u8);
                id_value.push(digits.bytes().fold(0, |v, d| v * 10 + u32::from(d - b'0')));
            }
        }
        c.kinds.push(kind);
        prev = Some(f);
    }
    c.nhs = planes(&nhs);
    c.start = planes(&start);
    c.end = planes(&end);
    c.dob = planes(&dob);
    c.id_value = planes(&id_value);
    postcard::to_stdvec(&c).map_err(|e| format!("encoding snapshot columns: {e}"))
}

/// Decodes the columnar wire form (after decompression) back into the snapshot body.
pub(crate) fn decode(raw: &[u8]) -> Result<SnapshotBody, String> {
    let (c, rest): (Columns, _) =
        postcard::take_from_bytes(raw).map_err(|e| format!("decoding columns: {e}"))?;
    if !rest.is_empty() {
        let n = rest.len();
        let s = if n == 1 { "" } else { "s" };
        return Err(format!("{n} byte{s} after the columns"));
    }
    let n = c.kinds.len();
    if let Some(bad) = c
        .kinds
        .iter()
        .find(|k| **k & !KNOWN_BITS != 0 || **k & PLAN_MASK == 3)
    {
        return Err(format!("a flag's kind byte {bad:#04x} is not defined"));
    }
    let count = |bit: u8, unless: u8| {
        c.kinds
            .iter()
            .filter(|k| **k & bit != 0 && **k & unless == 0)
            .count()
    };
    let nhs = unplanes(&c.nhs, n, "NHS number")?;
    let start = unplanes(&c.start, n, "start date")?;
    let end = unplanes(&c.end, count(HAS_END, 0), "end date")?;
    let dob = unplanes(&c.dob, count(HAS_DOB, SAME_DOB), "date of birth")?;
    let ids = count(HAS_LOCAL_ID, SAME_LOCAL_ID);
    let id_value = unplanes(&c.id_value, ids, "case id")?;
    if c.id_prefix.len() != ids || c.id_digits.len() != ids {
        return Err(format!(
            "case id columns hold {} prefixes and {} lengths for {ids} case ids",
            c.id_prefix.len(),
            c.id_digits.len()
        ));
    }
    let runs: u64 = c.council_runs.iter().map(|(_, len)| u64::from(*len)).sum();
    if runs != n as u64 {
        return Err(format!("council runs cover {runs} flags, not {n}"));
    }

    let mut councils = c
        .council_runs
        .iter()
        .flat_map(|(i, len)| std::iter::repeat_n(*i, *len as usize));
    let (mut end, mut dob, mut id_value) = (end.iter(), dob.iter(), id_value.iter());
    let (mut id_prefix, mut id_digits) = (c.id_prefix.iter(), c.id_digits.iter());
    let mut flags: Vec<FlagRecord> = Vec::with_capacity(n);
    let mut nine = 0i64;
    for (i, kind) in c.kinds.iter().enumerate() {
        let at = |what: &str| format!("flag {i}: {what}");
        let code = councils.next().ok_or_else(|| at("no council"))?;
        let council = c
            .codes
            .get(code as usize)
            .ok_or_else(|| at("council index out of range"))?
            .clone();
        nine = nine
            .checked_add(unzigzag(nhs[i]))
            .filter(|v| (0..1_000_000_000).contains(v))
            .ok_or_else(|| at("NHS number out of range"))?;
        let nhs_number = complete_nhs(nine).ok_or_else(|| at("not an NHS number"))?;
        let s = i64::from(c.start_base) + i64::from(start[i]);
        let start_date = day(s).ok_or_else(|| at("start date out of range"))?;
        let end_date = match kind & HAS_END {
            0 => None,
            _ => Some(day(s + unzigzag(*end.next().ok_or_else(|| at("end"))?)))
                .flatten()
                .map(Some)
                .ok_or_else(|| at("end date out of range"))?,
        };
        let prev = flags.last();
        let date_of_birth = if kind & HAS_DOB == 0 {
            None
        } else if kind & SAME_DOB != 0 {
            Some(
                prev.and_then(|p| p.date_of_birth)
                    .ok_or_else(|| at("repeats a date of birth the previous flag lacks"))?,
            )
        } else {
            let back = unzigzag(*dob.next().ok_or_else(|| at("date of birth"))?);
            Some(day(s - back).ok_or_else(|| at("date of birth out of range"))?)
        };
        let local_id = if kind & HAS_LOCAL_ID == 0 {
            None
        } else if kind & SAME_LOCAL_ID != 0 {
            Some(
                prev.and_then(|p| p.local_id.clone())
                    .ok_or_else(|| at("repeats a case id the previous flag lacks"))?,
            )
        } else {
            let (Some(p), Some(d), Some(v)) = (id_prefix.next(), id_digits.next(), id_value.next())
            else {
                return Err(at("case id"));
            };
            let prefix = c
                .prefixes
                .get(*p as usize)
                .ok_or_else(|| at("case id prefix out of range"))?;
            Some(join_id(prefix, usize::from(*d), *v).ok_or_else(|| at("case id digits"))?)
        };
        let plan_type = match kind & PLAN_MASK {
            0 => PlanType::Cpp,
            1 => PlanType::Lac,
            _ => PlanType::Ucpp,
        };
        flags.push(FlagRecord {
            council,
            nhs_number,
            plan_type,
            start_date,
            end_date,
            date_of_birth,
            local_id,
        });
    }
    Ok(SnapshotBody {
        councils: c.councils,
        flags,
        contacts: c.contacts,
    })
}

/// The index of `item` in a dictionary, added at the end when new.
fn index_of<Q>(dict: &mut Vec<Q::Owned>, item: &Q) -> u32
where
    Q: PartialEq + ToOwned + ?Sized,
    Q::Owned: Borrow<Q>,
{
    match dict.iter().position(|d| d.borrow() == item) {
        Some(i) => i as u32,
        None => {
            dict.push(item.to_owned());
            (dict.len() - 1) as u32
        }
    }
}

/// Splits a case id into what precedes its trailing digits and those digits (at most nine).
fn split_id(id: &str) -> (&str, &str) {
    let digits = id
        .bytes()
        .rev()
        .take_while(u8::is_ascii_digit)
        .take(MAX_ID_DIGITS)
        .count();
    id.split_at(id.len() - digits)
}

/// The inverse of [`split_id`]: `None` when the value has more digits than declared.
fn join_id(prefix: &str, digits: usize, value: u32) -> Option<String> {
    if digits > MAX_ID_DIGITS || (digits < MAX_ID_DIGITS && value >= 10u32.pow(digits as u32)) {
        return None;
    }
    if digits == 0 {
        return Some(prefix.to_owned());
    }
    Some(format!("{prefix}{value:0digits$}"))
}

fn complete_nhs(nine: i64) -> Option<NhsNumber> {
    let mut digits = [0u8; 9];
    let mut v = nine;
    for slot in digits.iter_mut().rev() {
        *slot = (v % 10) as u8;
        v /= 10;
    }
    NhsNumber::complete(digits)
}

fn day(n: i64) -> Option<NaiveDate> {
    NaiveDate::from_num_days_from_ce_opt(i32::try_from(n).ok()?)
}

fn zigzag(v: i64) -> Result<u32, String> {
    u32::try_from((v << 1) ^ (v >> 63)).map_err(|_| format!("difference {v} out of range"))
}

fn unzigzag(v: u32) -> i64 {
    let v = i64::from(v);
    (v >> 1) ^ -(v & 1)
}

/// Little-endian `u32`s as four byte planes.
fn planes(values: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 4];
    let n = values.len();
    for (i, v) in values.iter().enumerate() {
        for (b, byte) in v.to_le_bytes().into_iter().enumerate() {
            out[b * n + i] = byte;
        }
    }
    out
}

fn unplanes(bytes: &[u8], n: usize, what: &str) -> Result<Vec<u32>, String> {
    if Some(bytes.len()) != n.checked_mul(4) {
        return Err(format!(
            "the {what} column holds {} bytes, {n} values need {}",
            bytes.len(),
            n.saturating_mul(4)
        ));
    }
    Ok((0..n)
        .map(|i| u32::from_le_bytes([bytes[i], bytes[n + i], bytes[2 * n + i], bytes[3 * n + i]]))
        .collect())
}

//! Council upload parsing and whole-file validation (DESIGN.md §6, safety rule 7).
//!
//! The whole file is checked before anything is applied and every problem is reported with
//! its line and column. `today` is passed in; nothing here reads the clock.

use std::collections::HashMap;

use chrono::NaiveDate;
use cpis_protocol::api::{UPLOAD_COLUMNS, UploadError};
use cpis_protocol::{CouncilCode, FlagRecord, NhsNumber, PlanType, retained_until};

/// The most errors listed in one rejection; the last entry says when more were cut.
pub const MAX_ERRORS: usize = 1000;
/// Longest accepted council-local case id.
pub const MAX_LOCAL_ID: usize = 64;

/// Error codes of upload rows.
pub mod codes {
    pub const BAD_ENCODING: &str = "bad_encoding";
    pub const BAD_HEADER: &str = "bad_header";
    pub const BAD_ROW: &str = "bad_row";
    pub const EMPTY_UPLOAD: &str = "empty_upload";
    pub const BAD_PLAN_TYPE: &str = "bad_plan_type";
    pub const MISSING_VALUE: &str = "missing_value";
    pub const BAD_DATE: &str = "bad_date";
    pub const DATE_IN_FUTURE: &str = "date_in_future";
    pub const END_BEFORE_START: &str = "end_before_start";
    pub const DUPLICATE: &str = "duplicate_flag";
    pub const PAST_RETENTION: &str = "ended_past_retention";
    pub const LOCAL_ID_TOO_LONG: &str = "local_id_too_long";
    pub const TOO_MANY_ERRORS: &str = "too_many_errors";
}

/// A rejected upload: every problem found, at most [`MAX_ERRORS`] (plus one saying so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<UploadError>);

/// What the caller allows beyond the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadOptions {
    /// A file with a header and no rows removes all of the council's flags; without this it
    /// is refused, so that an accidentally empty export never wipes a council's flags.
    pub allow_empty: bool,
}

struct Errors(Vec<UploadError>, usize);

impl Errors {
    fn push(&mut self, line: u64, column: &str, code: &str, message: String) {
        self.1 += 1;
        if self.0.len() < MAX_ERRORS {
            self.0.push(UploadError {
                line,
                column: column.to_owned(),
                code: code.to_owned(),
                message,
            });
        }
    }

    fn finish(mut self) -> Vec<UploadError> {
        if self.1 > self.0.len() {
            let more = self.1 - self.0.len();
            self.0.push(UploadError {
                line: 0,
                column: String::new(),
                code: codes::TOO_MANY_ERRORS.to_owned(),
                message: format!(
                    "{more} more errors were found and are not listed (the first {MAX_ERRORS} are)"
                ),
            });
        }
        self.0
    }
}

fn parse_date(
    errors: &mut Errors,
    line: u64,
    column: &str,
    value: &str,
    today: NaiveDate,
) -> Option<NaiveDate> {
    let valid_shape = value.len() == 10
        && value.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    let parsed = valid_shape
        .then(|| NaiveDate::parse_from_str(value, "%Y-%m-%d").ok())
        .flatten();
    let Some(date) = parsed else {
        errors.push(
            line,
            column,
            codes::BAD_DATE,
            format!("{column} {value:?} is not a date in the form YYYY-MM-DD"),
        );
        return None;
    };
    if date > today {
        errors.push(
            line,
            column,
            codes::DATE_IN_FUTURE,
            format!("{column} {value} is in the future (today is {today})"),
        );
        return None;
    }
    Some(date)
}

/// Parses and validates a whole upload for `council`.
pub fn parse(
    council: &CouncilCode,
    body: &[u8],
    today: NaiveDate,
    options: UploadOptions,
) -> Result<Vec<FlagRecord>, Invalid> {
    let mut errors = Errors(Vec::new(), 0);
    let text = match std::str::from_utf8(body) {
        Ok(t) => t.strip_prefix('\u{feff}').unwrap_or(t),
        Err(e) => {
            let line = body[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64
                + 1;
            errors.push(
                line,
                "",
                codes::BAD_ENCODING,
                "the file is not UTF-8 text".to_owned(),
            );
            return Err(Invalid(errors.finish()));
        }
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    match records.next() {
        None => {
            errors.push(
                1,
                "",
                codes::BAD_HEADER,
                format!(
                    "the file is empty: the first line must be the header {}",
                    UPLOAD_COLUMNS.join(",")
                ),
            );
            return Err(Invalid(errors.finish()));
        }
        Some(Err(e)) => {
            errors.push(
                1,
                "",
                codes::BAD_HEADER,
                format!("the header cannot be read: {e}"),
            );
            return Err(Invalid(errors.finish()));
        }
        Some(Ok(header)) => {
            let found: Vec<String> = header.iter().map(|h| h.to_ascii_lowercase()).collect();
            if found != UPLOAD_COLUMNS {
                errors.push(
                    1,
                    "",
                    codes::BAD_HEADER,
                    format!(
                        "the header must be exactly {} (found {})",
                        UPLOAD_COLUMNS.join(","),
                        header.iter().collect::<Vec<_>>().join(",")
                    ),
                );
                return Err(Invalid(errors.finish()));
            }
        }
    }

    let mut flags = Vec::new();
    let mut seen: HashMap<(NhsNumber, PlanType), u64> = HashMap::new();
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                errors.push(
                    line,
                    "",
                    codes::BAD_ROW,
                    format!("the row cannot be read: {e}"),
                );
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(str::is_empty) {
            continue; // blank line
        }
        if record.len() != UPLOAD_COLUMNS.len() {
            errors.push(
                line,
                "",
                codes::BAD_ROW,
                format!(
                    "the row has {} fields, expected {}",
                    record.len(),
                    UPLOAD_COLUMNS.len()
                ),
            );
            continue;
        }
        let field = |i: usize| record.get(i).unwrap_or_default();
        let nhs_number = match field(0).parse::<NhsNumber>() {
            Ok(n) => Some(n),
            Err(e) => {
                errors.push(line, "nhs_number", e.code(), e.to_string());
                None
            }
        };
        let plan_type = match field(1).parse::<PlanType>() {
            Ok(p) => Some(p),
            Err(e) => {
                let message = if field(1).is_empty() {
                    "plan_type is required: CPP, LAC or UCPP".to_owned()
                } else {
                    format!("plan_type {:?} {}", field(1), e.reason)
                };
                errors.push(line, "plan_type", codes::BAD_PLAN_TYPE, message);
                None
            }
        };
        let start_date = if field(2).is_empty() {
            errors.push(
                line,
                "start_date",
                codes::MISSING_VALUE,
                "start_date is required".to_owned(),
            );
            None
        } else {
            parse_date(&mut errors, line, "start_date", field(2), today)
        };
        let mut dates_ok = start_date.is_some();
        let end_date = if field(3).is_empty() {
            None
        } else {
            let d = parse_date(&mut errors, line, "end_date", field(3), today);
            dates_ok &= d.is_some();
            d
        };
        let date_of_birth = if field(4).is_empty() {
            None
        } else {
            let d = parse_date(&mut errors, line, "date_of_birth", field(4), today);
            dates_ok &= d.is_some();
            d
        };
        let local_id = (!field(5).is_empty()).then(|| field(5).to_owned());
        if let Some(id) = &local_id
            && id.chars().count() > MAX_LOCAL_ID
        {
            errors.push(
                line,
                "local_id",
                codes::LOCAL_ID_TOO_LONG,
                format!("local_id is longer than {MAX_LOCAL_ID} characters"),
            );
            dates_ok = false;
        }
        if let (Some(start), Some(end)) = (start_date, end_date) {
            if end < start {
                errors.push(
                    line,
                    "end_date",
                    codes::END_BEFORE_START,
                    format!("end_date {end} is before start_date {start}"),
                );
                dates_ok = false;
            } else if retained_until(end) < today {
                errors.push(
                    line,
                    "end_date",
                    codes::PAST_RETENTION,
                    format!(
                        "the plan ended on {end}, more than 12 months ago; ended plans are \
                         carried until 12 months after their end date, so leave this row out"
                    ),
                );
                dates_ok = false;
            }
        }
        if let (Some(n), Some(p)) = (nhs_number, plan_type) {
            if let Some(first) = seen.get(&(n, p)) {
                errors.push(
                    line,
                    "",
                    codes::DUPLICATE,
                    format!("NHS number {n} already has a {p} row on line {first}"),
                );
                continue;
            }
            seen.insert((n, p), line);
        }
        if let (Some(nhs_number), Some(plan_type), Some(start_date), true) =
            (nhs_number, plan_type, start_date, dates_ok)
        {
            flags.push(FlagRecord {
                council: council.clone(),
                nhs_number,
                plan_type,
                start_date,
                end_date,
                date_of_birth,
                local_id,
            });
        }
    }
    if errors.1 == 0 && flags.is_empty() && !options.allow_empty {
        errors.push(
            2,
            "",
            codes::EMPTY_UPLOAD,
            "the file has a header but no rows; this would remove every flag of the council. \
             If that is intended, send it again with ?allow_empty=true"
                .to_owned(),
        );
    }
    if errors.1 > 0 {
        return Err(Invalid(errors.finish()));
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 6, 1).unwrap()
    }

    fn council() -> CouncilCode {
        "E06000018".parse().unwrap()
    }

    const HEADER: &str = "nhs_number,plan_type,start_date,end_date,date_of_birth,local_id\n";

    #[test]
    fn valid_file_parses() {
        let body = format!(
            "{HEADER}943 476 5919,CPP,2024-01-02,,2015-05-05,C-1\n6541003238,lac,2023-01-01,2025-01-01,,\n"
        );
        let flags = parse(
            &council(),
            body.as_bytes(),
            today(),
            UploadOptions::default(),
        )
        .unwrap();
        assert_eq!(flags.len(), 2);
        assert_eq!(flags[0].local_id.as_deref(), Some("C-1"));
        assert_eq!(flags[1].plan_type, PlanType::Lac);
    }

    #[test]
    fn every_error_is_listed_with_line_and_column() {
        let body = format!(
            "{HEADER}9434765918,CPP,2024-01-02,,,\n\
             9434765919,XYZ,2024-13-01,,,\n\
             9434765919,CPP,2024-01-01,2023-01-01,,\n\
             6541003238,LAC,2020-01-01,2023-01-01,,\n\
             6541003238,UCPP,2026-01-01,,,\n\
             6541003238,UCPP,2024-01-01,,,\n"
        );
        let Invalid(errors) = parse(
            &council(),
            body.as_bytes(),
            today(),
            UploadOptions::default(),
        )
        .unwrap_err();
        let got: Vec<(u64, &str, &str)> = errors
            .iter()
            .map(|e| (e.line, e.column.as_str(), e.code.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, "nhs_number", "nhs_number_check_digit_mismatch"),
                (3, "plan_type", codes::BAD_PLAN_TYPE),
                (3, "start_date", codes::BAD_DATE),
                (4, "end_date", codes::END_BEFORE_START),
                (5, "end_date", codes::PAST_RETENTION),
                (6, "start_date", codes::DATE_IN_FUTURE),
                (7, "", codes::DUPLICATE),
            ]
        );
        assert!(errors[6].message.contains("line 6"));
    }

    #[test]
    fn header_must_match() {
        let Invalid(errors) = parse(
            &council(),
            b"nhs,plan\n9434765919,CPP\n",
            today(),
            UploadOptions::default(),
        )
        .unwrap_err();
        assert_eq!(errors[0].code, codes::BAD_HEADER);
        assert_eq!(errors[0].line, 1);
    }

    #[test]
    fn empty_list_needs_consent() {
        let err = parse(
            &council(),
            HEADER.as_bytes(),
            today(),
            UploadOptions::default(),
        );
        assert_eq!(err.unwrap_err().0[0].code, codes::EMPTY_UPLOAD);
        let ok = parse(
            &council(),
            HEADER.as_bytes(),
            today(),
            UploadOptions { allow_empty: true },
        );
        assert_eq!(ok.unwrap(), vec![]);
    }

    #[test]
    fn errors_are_capped() {
        let mut body = HEADER.to_owned();
        for _ in 0..1500 {
            body.push_str("123,CPP,2024-01-01,,,\n");
        }
        let Invalid(errors) = parse(
            &council(),
            body.as_bytes(),
            today(),
            UploadOptions::default(),
        )
        .unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS + 1);
        assert_eq!(errors[MAX_ERRORS].code, codes::TOO_MANY_ERRORS);
        assert!(errors[MAX_ERRORS].message.starts_with("500 more"));
    }
}

//! A column's Parquet mapping, and the Arrow builder that takes its values
//! as PostgreSQL prints them (COPY's text form, with `DateStyle = ISO`,
//! `IntervalStyle = iso_8601`, `TimeZone = UTC`). The table of mappings is
//! docs/analytics.md.

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    StringDictionaryBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, ListArray};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, TimeUnit};
use std::sync::Arc;

/// What a column becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// Text, and every type exported as its text form.
    Text,
    /// json and jsonb: the JSON text, annotated with Parquet's JSON logical type.
    Json,
    Binary,
    Date,
    Time,
    Timestamp,
    TimestampUtc,
    /// An enum: dictionary-encoded strings.
    Enum,
    /// A one-dimensional array of the element kind.
    List(Box<Kind>),
}

impl Kind {
    pub fn arrow(&self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int16 => DataType::Int16,
            Kind::Int32 => DataType::Int32,
            Kind::Int64 => DataType::Int64,
            Kind::Float32 => DataType::Float32,
            Kind::Float64 => DataType::Float64,
            Kind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            Kind::Text | Kind::Json => DataType::Utf8,
            Kind::Binary => DataType::Binary,
            Kind::Date => DataType::Date32,
            Kind::Time => DataType::Time64(TimeUnit::Microsecond),
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::TimestampUtc => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Kind::Enum => DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            Kind::List(e) => DataType::List(Arc::new(Field::new("element", e.arrow(), true))),
        }
    }

    /// The column's Arrow field (JSON carries the canonical `arrow.json`
    /// extension, which the Parquet writer turns into the JSON logical type).
    pub fn field(&self, name: &str) -> Field {
        let f = Field::new(name, self.arrow(), true);
        match self {
            Kind::Json => f.with_extension_type(arrow_schema::extension::Json::default()),
            _ => f,
        }
    }

    /// How the manifest and the docs name it.
    pub fn describe(&self) -> String {
        match self {
            Kind::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            Kind::List(e) => format!("list<{}>", e.describe()),
            Kind::TimestampUtc => "timestamp[us, UTC]".into(),
            Kind::Timestamp => "timestamp[us]".into(),
            Kind::Time => "time[us]".into(),
            Kind::Enum => "dictionary<string>".into(),
            other => format!("{other:?}").to_lowercase(),
        }
    }

    /// The kind of a PostgreSQL type, by its base type's name (`typname`),
    /// `typtype` and the column's `atttypmod`; `None`: no mapping (the column
    /// may still go out as text). Arrays are asked with the element's.
    pub fn of_postgres(typname: &str, typtype: &str, typmod: i32) -> Option<Kind> {
        Some(match typname {
            "bool" => Kind::Bool,
            "int2" => Kind::Int16,
            "int4" => Kind::Int32,
            "int8" => Kind::Int64,
            "float4" => Kind::Float32,
            "float8" => Kind::Float64,
            "numeric" => {
                // numeric(p,s): typmod = ((p << 16) | s) + 4; unconstrained: -1.
                if typmod < 4 {
                    Kind::Text
                } else {
                    let p = ((typmod - 4) >> 16) & 0xffff;
                    let s = (typmod - 4) & 0x7ff;
                    if p > 38 || s > p {
                        Kind::Text
                    } else {
                        Kind::Decimal {
                            precision: p as u8,
                            scale: s as i8,
                        }
                    }
                }
            }
            "text" | "varchar" | "bpchar" | "name" | "citext" | "uuid" | "interval" => Kind::Text,
            "json" | "jsonb" => Kind::Json,
            "bytea" => Kind::Binary,
            "date" => Kind::Date,
            "time" => Kind::Time,
            "timestamp" => Kind::Timestamp,
            "timestamptz" => Kind::TimestampUtc,
            _ if typtype == "e" => Kind::Enum,
            _ => return None,
        })
    }
}

/// Why a value did not fit its column.
#[derive(Debug)]
pub struct BadValue(pub String);

/// Collects one column's values for a batch.
pub enum Builder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Text(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder, bool),
    Enum(StringDictionaryBuilder<Int32Type>),
    List(Box<ListBuilder>),
}

pub struct ListBuilder {
    element: Kind,
    offsets: Vec<i32>,
    valid: Vec<bool>,
    values: Builder,
}

impl Builder {
    pub fn new(kind: &Kind) -> Self {
        match kind {
            Kind::Bool => Builder::Bool(BooleanBuilder::new()),
            Kind::Int16 => Builder::Int16(Int16Builder::new()),
            Kind::Int32 => Builder::Int32(Int32Builder::new()),
            Kind::Int64 => Builder::Int64(Int64Builder::new()),
            Kind::Float32 => Builder::Float32(Float32Builder::new()),
            Kind::Float64 => Builder::Float64(Float64Builder::new()),
            Kind::Decimal { precision, scale } => {
                Builder::Decimal(Decimal128Builder::new(), *precision, *scale)
            }
            Kind::Text | Kind::Json => Builder::Text(StringBuilder::new()),
            Kind::Binary => Builder::Binary(BinaryBuilder::new()),
            Kind::Date => Builder::Date(Date32Builder::new()),
            Kind::Time => Builder::Time(Time64MicrosecondBuilder::new()),
            Kind::Timestamp => Builder::Timestamp(TimestampMicrosecondBuilder::new(), false),
            Kind::TimestampUtc => Builder::Timestamp(TimestampMicrosecondBuilder::new(), true),
            Kind::Enum => Builder::Enum(StringDictionaryBuilder::new()),
            Kind::List(e) => Builder::List(Box::new(ListBuilder {
                element: (**e).clone(),
                offsets: vec![0],
                valid: Vec::new(),
                values: Builder::new(e),
            })),
        }
    }

    /// Appends a value in PostgreSQL's text form (`None`: NULL).
    pub fn push_text(&mut self, v: Option<&str>) -> Result<(), BadValue> {
        let Some(v) = v else {
            self.push_null();
            return Ok(());
        };
        let bad = |what: &str| BadValue(format!("{v:?} is not {what}"));
        match self {
            Builder::Bool(b) => b.append_value(match v {
                "t" | "true" | "1" => true,
                "f" | "false" | "0" => false,
                _ => return Err(bad("a boolean")),
            }),
            Builder::Int16(b) => b.append_value(v.parse().map_err(|_| bad("a smallint"))?),
            Builder::Int32(b) => b.append_value(v.parse().map_err(|_| bad("an integer"))?),
            Builder::Int64(b) => b.append_value(v.parse().map_err(|_| bad("a bigint"))?),
            Builder::Float32(b) => b.append_value(parse_float(v).ok_or_else(|| bad("a real"))? as f32),
            Builder::Float64(b) => b.append_value(parse_float(v).ok_or_else(|| bad("a double"))?),
            Builder::Decimal(b, _, scale) => b.append_value(
                parse_decimal(v, *scale).ok_or_else(|| bad("a decimal of this scale (NaN and infinities have none: export the column as text)"))?,
            ),
            Builder::Text(b) => b.append_value(v),
            Builder::Binary(b) => {
                let hex = v.strip_prefix("\\x").ok_or_else(|| bad("bytea in hex form"))?;
                b.append_value(hex::decode(hex).map_err(|_| bad("bytea in hex form"))?)
            }
            Builder::Date(b) => b.append_value(parse_date(v).ok_or_else(|| bad("a date"))?),
            Builder::Time(b) => b.append_value(parse_time(v).ok_or_else(|| bad("a time"))?),
            Builder::Timestamp(b, utc) => {
                b.append_value(parse_timestamp(v, *utc).ok_or_else(|| bad("a timestamp"))?)
            }
            Builder::Enum(b) => {
                b.append_value(v);
            }
            Builder::List(l) => {
                let elements = parse_array(v).ok_or_else(|| {
                    bad("a one-dimensional array (export the column as text)")
                })?;
                for e in &elements {
                    l.values.push_text(e.as_deref())?;
                }
                let n = l.offsets.last().copied().unwrap_or(0) + elements.len() as i32;
                l.offsets.push(n);
                l.valid.push(true);
            }
        }
        Ok(())
    }

    pub fn push_null(&mut self) {
        match self {
            Builder::Bool(b) => b.append_null(),
            Builder::Int16(b) => b.append_null(),
            Builder::Int32(b) => b.append_null(),
            Builder::Int64(b) => b.append_null(),
            Builder::Float32(b) => b.append_null(),
            Builder::Float64(b) => b.append_null(),
            Builder::Decimal(b, ..) => b.append_null(),
            Builder::Text(b) => b.append_null(),
            Builder::Binary(b) => b.append_null(),
            Builder::Date(b) => b.append_null(),
            Builder::Time(b) => b.append_null(),
            Builder::Timestamp(b, _) => b.append_null(),
            Builder::Enum(b) => b.append_null(),
            Builder::List(l) => {
                let n = l.offsets.last().copied().unwrap_or(0);
                l.offsets.push(n);
                l.valid.push(false);
            }
        }
    }

    /// SQLite's values, by the column's kind (Int64, Float64, Text, Binary).
    pub fn push_i64(&mut self, v: i64) -> Result<(), BadValue> {
        match self {
            Builder::Int64(b) => b.append_value(v),
            Builder::Float64(b) => b.append_value(v as f64),
            Builder::Text(b) => b.append_value(v.to_string()),
            _ => {
                return Err(BadValue(format!(
                    "the integer {v} in a column of another type"
                )));
            }
        }
        Ok(())
    }

    pub fn push_f64(&mut self, v: f64) -> Result<(), BadValue> {
        match self {
            Builder::Float64(b) => b.append_value(v),
            Builder::Text(b) => b.append_value(v.to_string()),
            _ => {
                return Err(BadValue(format!(
                    "the real {v} in a column of another type"
                )));
            }
        }
        Ok(())
    }

    pub fn push_bytes(&mut self, v: &[u8]) -> Result<(), BadValue> {
        match self {
            Builder::Binary(b) => b.append_value(v),
            _ => {
                return Err(BadValue(format!(
                    "a blob of {} bytes in a column of another type",
                    v.len()
                )));
            }
        }
        Ok(())
    }

    pub fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Int16(b) => Arc::new(b.finish()),
            Builder::Int32(b) => Arc::new(b.finish()),
            Builder::Int64(b) => Arc::new(b.finish()),
            Builder::Float32(b) => Arc::new(b.finish()),
            Builder::Float64(b) => Arc::new(b.finish()),
            Builder::Decimal(b, p, s) => Arc::new(
                b.finish()
                    .with_precision_and_scale(*p, *s)
                    .unwrap_or_else(|_| unreachable!("precision and scale checked by Kind")),
            ),
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Binary(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Time(b) => Arc::new(b.finish()),
            Builder::Timestamp(b, utc) => {
                let a = b.finish();
                Arc::new(if *utc { a.with_timezone("UTC") } else { a })
            }
            Builder::Enum(b) => Arc::new(b.finish()),
            Builder::List(l) => {
                let values = l.values.finish();
                let offsets = OffsetBuffer::new(std::mem::replace(&mut l.offsets, vec![0]).into());
                let valid = std::mem::take(&mut l.valid);
                let nulls = valid.iter().any(|v| !v).then(|| NullBuffer::from(valid));
                let field = Arc::new(Field::new("element", l.element.arrow(), true));
                Arc::new(ListArray::new(field, offsets, values, nulls))
            }
        }
    }
}

fn parse_float(v: &str) -> Option<f64> {
    match v {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => v.parse().ok(),
    }
}

/// `-12.340` at scale 3 → -12340.
fn parse_decimal(v: &str, scale: i8) -> Option<i128> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale.max(0) as usize
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut n: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        n = n.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for _ in frac.len()..scale.max(0) as usize {
        n = n.checked_mul(10)?;
    }
    Some(if neg { -n } else { n })
}

/// `2024-02-29`, `0044-03-15 BC`, `infinity`: days since 1970-01-01
/// (±infinity as i32's extremes, PostgreSQL's own encoding).
fn parse_date(v: &str) -> Option<i32> {
    match v {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (v, bc) = match v.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (v, false),
    };
    let mut parts = v.splitn(3, '-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    let y = if bc { 1 - y } else { y };
    let date = chrono::NaiveDate::from_ymd_opt(y, m, d)?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((date - epoch).num_days()).ok()
}

/// `23:59:59.999999`: microseconds since midnight.
fn parse_time(v: &str) -> Option<i64> {
    let (hms, frac) = v.split_once('.').unwrap_or((v, ""));
    let mut p = hms.splitn(3, ':');
    let h: i64 = p.next()?.parse().ok()?;
    let m: i64 = p.next()?.parse().ok()?;
    let s: i64 = p.next()?.parse().ok()?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// `2024-02-29 12:34:56.789` (`+00` with `TimeZone = UTC` for timestamptz),
/// `infinity`: microseconds since the epoch (±infinity as i64's extremes).
fn parse_timestamp(v: &str, utc: bool) -> Option<i64> {
    match v {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (v, bc) = match v.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (v, false),
    };
    let v = if utc { v.strip_suffix("+00")? } else { v };
    let (date, time) = v.split_once(' ')?;
    let days = i64::from(parse_date(&if bc {
        format!("{date} BC")
    } else {
        date.to_owned()
    })?);
    Some(days * 86_400_000_000 + parse_time(time)?)
}

/// A one-dimensional array literal (`{1,NULL,"a b","c\"d"}`) into its
/// elements' text (`None`: NULL); `None` for anything else (nested arrays,
/// bounds).
pub fn parse_array(v: &str) -> Option<Vec<Option<String>>> {
    let inner = v.strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    if inner.is_empty() {
        return Some(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next()? {
                    '\\' => s.push(chars.next()?),
                    '"' => break,
                    c => s.push(c),
                }
            }
            out.push(Some(s));
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None;
                }
                s.push(c);
                chars.next();
            }
            out.push(if s == "NULL" { None } else { Some(s) });
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_parse() {
        assert_eq!(parse_decimal("-12.34", 3), Some(-12340));
        assert_eq!(parse_decimal("0.001", 2), None);
        assert_eq!(parse_date("1970-01-02"), Some(1));
        assert_eq!(parse_date("0001-12-31 BC"), Some(-719163));
        assert_eq!(parse_time("00:00:01.5"), Some(1_500_000));
        assert_eq!(
            parse_timestamp("1970-01-01 00:00:01+00", true),
            Some(1_000_000)
        );
        assert_eq!(
            parse_array(r#"{"a b",NULL,"c\"d",""}"#),
            Some(vec![
                Some("a b".into()),
                None,
                Some("c\"d".into()),
                Some(String::new())
            ])
        );
        assert_eq!(parse_array("{{1,2},{3,4}}"), None);
        assert_eq!(
            Kind::of_postgres("numeric", "b", ((10 << 16) | 2) + 4),
            Some(Kind::Decimal {
                precision: 10,
                scale: 2
            })
        );
    }
}

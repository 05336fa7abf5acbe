//! Durations in configuration files as humantime strings (`"90s"`, `"5m"`,
//! `"15d"`), for `#[serde(with = "ferry_common::duration")]`.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"90s\", \"5m\" or \"15d\""
        ))
    })
}

/// `Option<Duration>` (an absent key is `None`), for
/// `#[serde(default, with = "ferry_common::duration::option")]`.
pub mod option {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super")] Duration);
        Ok(Some(Wrap::deserialize(d)?.0))
    }
}

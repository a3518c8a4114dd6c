//! Serde for the ids that travel as text in the catalog and the shim protocol (`deltafs::StackId`,
//! `deltacr::image::ImageId`): parsed once where a record or message is read, typed everywhere else.
//! (`ImageId`'s own serde form is the binary one of DeltaCR's image header.)

use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serializer};

/// `#[serde(with = "crate::ids::text")]`: an id as its text form.
pub mod text {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(id: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "crate::ids::opt_text")]`: an optional id as its text form or null.
pub mod opt_text {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(id: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.collect_str(id),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(d)?.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
    }
}

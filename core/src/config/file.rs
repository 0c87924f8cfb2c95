//! The YAML document as a user writes it, and the value types that read its scalars with one-line
//! errors (durations, counts, argv lists, octal file modes).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::client_address::{Cidr, ClientAddressSource};

use super::{parse_duration, parse_file_mode, Routing};

/// The YAML document exactly as a user writes it; every field optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileConfig {
    pub(super) port: Option<u16>,
    pub(super) host: Option<String>,
    pub(super) concurrency: Option<Count>,
    pub(super) debug: Option<bool>,
    pub(super) prefix: Option<String>,
    pub(super) hard_shutdown_delay: Option<Millis>,
    pub(super) env: Option<BTreeMap<String, EnvValue>>,
    pub(super) worker: Option<WorkerSection>,
    pub(super) workers: Option<AttachSection>,
    pub(super) queue: Option<QueueSection>,
    pub(super) metrics: Option<MetricsSection>,
    pub(super) client_address: Option<ClientAddressSource>,
    pub(super) routing: Option<Routing>,
    pub(super) backlog: Option<Count>,
    pub(super) trusted_proxies: Option<Vec<CidrText>>,
    pub(super) header_wait: Option<HeaderWaitSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct HeaderWaitSection {
    pub(super) limit: Option<Count>,
    pub(super) max_wait: Option<Millis>,
}

/// One `trustedProxies` entry: an address or a CIDR block.
#[derive(Debug, Clone, Copy)]
pub(super) struct CidrText(pub(super) Cidr);

impl<'de> Deserialize<'de> for CidrText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar_with(deserializer, "an address block such as 10.0.0.0/8", |text| text.parse().map(CidrText))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsSection {
    pub(super) port: u16,
    pub(super) host: Option<IpAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkerSection {
    pub(super) command: Option<Argv>,
    pub(super) cwd: Option<PathBuf>,
    pub(super) protocol: Option<crate::activation::WorkerProtocol>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AttachSection {
    pub(super) socket: PathBuf,
    pub(super) mode: Option<FileMode>,
    #[serde(default)]
    pub(super) allow_uids: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct QueueSection {
    pub(super) limit: Option<Count>,
    pub(super) max_wait: Option<Millis>,
    pub(super) per_source: Option<Count>,
}

/// Reads a YAML scalar (string, number or boolean) as text and converts it with `convert`, inside the
/// deserializer, so that a conversion error carries the key's path and line.
pub(super) fn scalar_with<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    convert: fn(String) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Visitor<T> {
        expecting: &'static str,
        convert: fn(String) -> Result<T, String>,
    }
    impl<T> de::Visitor<'_> for Visitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            (self.convert)(text.to_string()).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
            (self.convert)(n.to_string()).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
            (self.convert)(n.to_string()).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, x: f64) -> Result<T, E> {
            (self.convert)(x.to_string()).map_err(E::custom)
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<T, E> {
            (self.convert)(b.to_string()).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(Visitor { expecting, convert })
}

/// A whole number that fits a `u32`; its bounds are the validation's (`Config::validate`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Count(pub(super) u32);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar_with(deserializer, "a whole number", |text| match text.parse::<u64>() {
            Ok(n) => u32::try_from(n).map(Count).map_err(|_| format!("{n} is too large (at most {})", u32::MAX)),
            Err(_) => Err(format!("{text:?} is not a whole number")),
        })
    }
}

/// A duration: an integer of milliseconds or a text such as `60s`, `1500ms`, `2m`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Millis(pub(super) Duration);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar_with(deserializer, "milliseconds as an integer or a duration such as \"60s\"", |text| {
            if text.starts_with('-') {
                return Err(format!("must not be negative, got {text}"));
            }
            parse_duration(&text).map(Millis)
        })
    }
}

/// A worker command: a non-empty argv list whose program is not empty.
#[derive(Debug, Clone)]
pub(super) struct Argv(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Argv;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list: the program and its arguments")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                match argv.first() {
                    None => Err(de::Error::custom("must not be empty: give the program and its arguments as a list")),
                    Some(program) if program.trim().is_empty() => Err(de::Error::custom("the program name is empty")),
                    Some(_) => Ok(Argv(argv)),
                }
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

/// An environment value: YAML strings, numbers and booleans, as text.
#[derive(Debug, Clone)]
pub(super) struct EnvValue(pub(super) String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar_with(deserializer, "a string, number or boolean", |text| Ok(EnvValue(text)))
    }
}

/// A Unix file mode, read as the octal it says: `0o660`, `0660` and `"0660"` all mean 0660.
#[derive(Debug, Clone, Copy)]
pub(super) struct FileMode(pub(super) u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = FileMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal file mode such as \"0660\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<FileMode, E> {
                parse_file_mode(text).map(FileMode).map_err(E::custom)
            }
        }
        // As text, the scalar exactly as written: a YAML integer would have lost `0o660` (read as 432)
        // or a decimal `660` would pass for a mode.
        deserializer.deserialize_str(Visitor)
    }
}

/// The line of `key` (dotted: `queue.limit`) in a YAML document, or `None` when the document does not set
/// it. The YAML library tells lines only with its errors, so the search stops with one at the key's value.
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let path: Vec<&str> = key.split('.').collect();
    let error = de::DeserializeSeed::deserialize(KeyPath(&path), serde_yaml::Deserializer::from_str(text)).err()?;
    // Only the stop at the key counts (an empty document is an error of its own).
    if !error.to_string().contains(HERE) {
        return None;
    }
    error.location().map(|location| location.line())
}

/// Walks mappings along a key path and fails at the value of its last key (`Here`).
struct KeyPath<'a, 'b>(&'a [&'b str]);

impl<'de> de::DeserializeSeed<'de> for KeyPath<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> de::Visitor<'de> for KeyPath<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<serde_yaml::Value>()? {
            match self.0.split_first() {
                Some((first, rest)) if key.as_str() == Some(first) => {
                    return match rest.is_empty() {
                        true => map.next_value_seed(Here),
                        false => map.next_value_seed(KeyPath(rest)),
                    };
                }
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    // Scalars and sequences hold no keys: not found.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// The value that was looked for: refuses whatever it is, so the error carries its line.
struct Here;

/// What `Here` expects, to tell its error from any other.
const HERE: &str = "nothing (this is where the key is)";

impl<'de> de::DeserializeSeed<'de> for Here {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(Here)
    }
}

impl de::Visitor<'_> for Here {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(HERE)
    }
}

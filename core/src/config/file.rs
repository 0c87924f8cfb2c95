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
    pub(super) concurrency: Option<Concurrency>,
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
    pub(super) backlog: Option<Concurrency>,
    pub(super) trusted_proxies: Option<Vec<CidrText>>,
    pub(super) header_wait: Option<HeaderWaitSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct HeaderWaitSection {
    pub(super) limit: Option<Concurrency>,
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
    pub(super) limit: Option<Concurrency>,
    pub(super) max_wait: Option<Millis>,
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

/// A count that must be at least 1.
#[derive(Debug, Clone, Copy)]
pub(super) struct Concurrency(pub(super) u32);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar_with(deserializer, "a whole number of at least 1", |text| match text.parse::<u64>() {
            Ok(0) => Err("must be at least 1, got 0".into()),
            Ok(n) => u32::try_from(n).map(Concurrency).map_err(|_| format!("{n} is too large")),
            Err(_) => Err(format!("{text:?} is not a whole number of at least 1")),
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

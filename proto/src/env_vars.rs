//! `EnvVars`: a site's environment variables, as a small sorted list.
//!
//! A `BTreeMap` allocates a whole 11-slot node (about 540 bytes) for even one variable, and
//! an informer holds every site's record: at 100,000 sites that alone was ~55 MB of an agent's
//! memory. A site sets a handful of variables, so a sorted `Vec` (binary search) holds them
//! in exactly their own size, with the same map-like API and the same JSON object form.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Name → value, sorted by name, each name once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvVars(Vec<(String, String)>);

impl EnvVars {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Set `name`, returning its previous value.
    pub fn insert(&mut self, name: String, value: String) -> Option<String> {
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// Unset `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.position(name).ok()?;
        Some(self.0.remove(i).1)
    }

    pub fn get(&self, name: &str) -> Option<&String> {
        let i = self.position(name).ok()?;
        Some(&self.0[i].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every variable, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Every name, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Every value, in name order.
    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Drop spare capacity (a decoded record is kept for as long as the informer runs).
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(name))
    }
}

impl<'a> IntoIterator for &'a EnvVars {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl FromIterator<(String, String)> for EnvVars {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(vars: I) -> Self {
        let mut env = Self::new();
        for (k, v) in vars {
            env.insert(k, v);
        }
        env
    }
}

impl Serialize for EnvVars {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vars;
        impl<'de> Visitor<'de> for Vars {
            type Value = EnvVars;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of environment variable names to string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvVars, A::Error> {
                // A name given twice keeps its last value, as a JSON object decoded to a map does.
                let mut env = EnvVars::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    env.insert(k, v);
                }
                env.shrink_to_fit();
                Ok(env)
            }
        }
        d.deserialize_map(Vars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_sorted_map() {
        let mut env = EnvVars::new();
        assert_eq!(env.insert("B".into(), "1".into()), None);
        assert_eq!(env.insert("A".into(), "2".into()), None);
        assert_eq!(env.insert("B".into(), "3".into()), Some("1".into()));
        assert_eq!(env.get("B").map(String::as_str), Some("3"));
        assert!(env.contains_key("A") && !env.contains_key("C"));
        let names: Vec<&String> = env.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["A", "B"]);
        assert_eq!(env.remove("A"), Some("2".into()));
        assert_eq!(env.remove("A"), None);
        assert_eq!(env.len(), 1);
    }

    #[test]
    fn json_is_an_object_and_a_repeated_name_keeps_the_last_value() {
        let env: EnvVars = serde_json::from_str(r#"{"Z":"1","A":"x","Z":"2"}"#).unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(env.get("Z").map(String::as_str), Some("2"));
        assert_eq!(serde_json::to_string(&env).unwrap(), r#"{"A":"x","Z":"2"}"#);
        assert!(serde_json::from_str::<EnvVars>(r#"["A"]"#).is_err());
        assert!(serde_json::from_str::<EnvVars>(r#"{"A":1}"#).is_err());
    }
}

//! An envelope's top-level attributes, read without building a JSON tree.
//!
//! Each member of the object is kept as its name and its raw JSON text,
//! borrowed from the body. The host needs a dozen short strings out of an
//! envelope and the payload as bytes: building a `serde_json::Value` for
//! all of it (a map, a string per attribute, a tree for `data`) and then
//! copying the strings out again was most of what receiving cost.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object's members in the order they were sent: (name, raw JSON).
#[derive(Debug)]
pub(super) struct Attributes<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Attributes<'a> {
    /// Reads `body` as a JSON object; anything else is an error.
    pub fn read(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The member called `name`. When a name is sent twice the later one
    /// counts, as it would in a `serde_json::Map`.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(member, _)| member == name).map(|(_, value)| *value)
    }

    /// Every member, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.0.iter().map(|(name, value)| (name.as_ref(), *value))
    }
}

/// The text of a JSON string; `None` when the value is not a string.
pub(super) fn string(raw: &RawValue) -> Option<String> {
    let json = raw.get();
    if !json.starts_with('"') {
        return None;
    }
    // Attribute values rarely hold escapes; without one, the text between
    // the quotes is the string (the parser has already checked it).
    if !json.contains('\\') {
        return Some(json[1..json.len() - 1].to_owned());
    }
    serde_json::from_str(json).ok()
}

/// Whether the value is JSON `null`.
pub(super) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

impl<'de> Deserialize<'de> for Attributes<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor)
    }
}

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Attributes<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(12));
        while let Some((Name(name), value)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
            members.push((name, value));
        }
        Ok(Attributes(members))
    }
}

/// A member name, borrowed from the body unless it holds an escape
/// (serde's `borrow` on a `Cow<str>` does exactly that).
#[derive(serde::Deserialize)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_borrowed_unless_escaped() {
        let attributes = Attributes::read(br#"{"plain": 1, "a\u0041": 2}"#).unwrap();
        assert!(matches!(attributes.0[0].0, Cow::Borrowed("plain")));
        assert!(matches!(&attributes.0[1].0, Cow::Owned(name) if name == "aA"));
    }

    #[test]
    fn members_keep_their_order_and_raw_text() {
        let attributes = Attributes::read(br#"{"b": [1, 2], "a\u0041": "x\"y", "n": null}"#).unwrap();
        let members: Vec<_> = attributes.iter().map(|(name, raw)| (name.to_owned(), raw.get().to_owned())).collect();
        assert_eq!(members, [("b".into(), "[1, 2]".into()), ("aA".into(), r#""x\"y""#.into()), ("n".into(), "null".into())]);
        assert_eq!(attributes.get("aA").and_then(string).as_deref(), Some("x\"y"));
        assert_eq!(attributes.get("b").and_then(string), None);
        assert!(attributes.get("n").is_some_and(is_null));
        assert!(attributes.get("missing").is_none());
    }

    #[test]
    fn a_repeated_name_counts_once_with_its_last_value() {
        let attributes = Attributes::read(br#"{"id": "first", "id": "second"}"#).unwrap();
        assert_eq!(attributes.get("id").and_then(string).as_deref(), Some("second"));
    }

    #[test]
    fn only_objects_are_read() {
        for body in [&b"[1]"[..], b"\"text\"", b"{\"a\":", b"", b"{\"a\": 1} trailing"] {
            assert!(Attributes::read(body).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }
}

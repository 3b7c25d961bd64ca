//! Labels and attributes as a person writes them: a map
//! (`labels: {zone: a, tier: edge}`, as Kubernetes, hawkBit and AWS write
//! them) or the older list of `[key, value]` pairs. Both read into the same
//! pairs; they are written back as pairs, the form policies and agents see.

use serde::Deserializer;
use serde::de::{MapAccess, SeqAccess, Visitor};
use std::fmt;

/// `#[serde(deserialize_with = "crate::pairs::deserialize")]` for a
/// `Vec<(String, String)>` field. A map keeps the order it was written in.
pub fn deserialize<'de, D>(d: D) -> Result<Vec<(String, String)>, D::Error>
where
    D: Deserializer<'de>,
{
    d.deserialize_any(PairsVisitor)
}

struct PairsVisitor;

impl<'de> Visitor<'de> for PairsVisitor {
    type Value = Vec<(String, String)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of strings (`{zone: a}`) or a list of [key, value] pairs")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some((k, v)) = map.next_entry::<String, String>()? {
            out.push((k, v));
        }
        Ok(out)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(pair) = seq.next_element::<(String, String)>()? {
            out.push(pair);
        }
        Ok(out)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Node, Selector};

    #[test]
    fn labels_read_as_a_map_or_as_pairs_and_write_as_pairs() {
        let map: Node =
            serde_json::from_str(r#"{"id":"n1","labels":{"zone":"a","tier":"edge"}}"#).unwrap();
        let pairs: Node =
            serde_json::from_str(r#"{"id":"n1","labels":[["zone","a"],["tier","edge"]]}"#).unwrap();
        assert_eq!(map, pairs);
        assert_eq!(
            map.labels,
            [("zone".into(), "a".into()), ("tier".into(), "edge".into())]
        );
        let yaml: Selector =
            serde_saphyr::from_str("labels: {zone: a}\nattributes:\n  model: m1\n").unwrap();
        assert_eq!(yaml.labels, [("zone".into(), "a".into())]);
        assert_eq!(yaml.attributes, [("model".into(), "m1".into())]);
        let back = serde_json::to_value(&map).unwrap();
        assert_eq!(
            back["labels"],
            serde_json::json!([["zone", "a"], ["tier", "edge"]])
        );
        let bad = serde_json::from_str::<Node>(r#"{"id":"n1","labels":{"zone":3}}"#).unwrap_err();
        assert!(bad.to_string().contains("string"), "{bad}");
        let bad = serde_json::from_str::<Node>(r#"{"id":"n1","labels":"zone=a"}"#).unwrap_err();
        assert!(bad.to_string().contains("a map of strings"), "{bad}");
    }
}

//! Bytes in the config (a UDP probe's payload and expected answer): text,
//! sent as its UTF-8 bytes, or `{ hex: "..." }` for any bytes.

use std::fmt;

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, MapAccess, Visitor},
    ser::SerializeMap,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bytes {
    /// `payload: "ping"`: the text's UTF-8 bytes.
    Text(String),
    /// `payload: { hex: "0001ff" }`: checked by validation
    /// ([`Bytes::to_vec`] is `None` for bad hex).
    Hex(String),
}

impl Bytes {
    /// The bytes; `None` when the hex is not valid.
    pub fn to_vec(&self) -> Option<Vec<u8>> {
        match self {
            Bytes::Text(t) => Some(t.as_bytes().to_vec()),
            Bytes::Hex(h) => hex::decode(h.trim()).ok(),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bytes::Text(t) => s.serialize_str(t),
            Bytes::Hex(h) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("hex", h)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BytesVisitor)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("text, or { hex: \"...\" }")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
        Ok(Bytes::Text(v.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bytes, A::Error> {
        let mut hex: Option<String> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "hex" {
                return Err(de::Error::unknown_field(&key, &["hex"]));
            }
            if hex.is_some() {
                return Err(de::Error::duplicate_field("hex"));
            }
            hex = Some(map.next_value()?);
        }
        hex.map(Bytes::Hex)
            .ok_or_else(|| de::Error::missing_field("hex"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_hex() {
        let b: Bytes = serde_norway::from_str("ping").unwrap();
        assert_eq!(b.to_vec().unwrap(), b"ping");
        let b: Bytes = serde_norway::from_str("{ hex: \"00ff 10\" }").unwrap();
        assert_eq!(b, Bytes::Hex("00ff 10".into()));
        assert_eq!(b.to_vec(), None, "a space inside is not hex");
        let b: Bytes = serde_norway::from_str("{ hex: 00ff10 }").unwrap();
        assert_eq!(b.to_vec().unwrap(), [0, 0xff, 0x10]);
        for (text, needle) in [
            ("{ hx: 00 }", "unknown field `hx`"),
            ("{}", "missing field `hex`"),
            ("[1]", "expected text, or { hex:"),
        ] {
            let e = serde_norway::from_str::<Bytes>(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        for b in [Bytes::Text("a b".into()), Bytes::Hex("0a".into())] {
            let text = serde_norway::to_string(&b).unwrap();
            assert_eq!(serde_norway::from_str::<Bytes>(&text).unwrap(), b);
        }
    }
}

//! Signed metadata as TUF writes it: `{"signed": {…}, "signatures": [{"keyid", "sig"}]}`,
//! each signature an ed25519 signature of the canonical JSON (OLPC canonical form, via
//! `olpc-cjson`) of `signed`.
//!
//! Verification works on the `signed` value exactly as it was parsed, before it is read
//! as a typed document: a field a newer writer added is covered by the signature, and
//! nothing is interpreted until enough trusted keys vouch for it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::{KeyPair, Trust};

/// One signature: the signing key's id and the signature, both hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signing key's id ([`crate::PublicKey::key_id`]).
    pub keyid: String,
    /// The ed25519 signature, hex.
    pub sig: String,
}

/// A signed document, untyped until verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The document the signatures cover.
    pub signed: serde_json::Value,
    /// Its signatures.
    pub signatures: Vec<Signature>,
}

/// The canonical JSON bytes of `value` (what is signed). Floats have no canonical form
/// and are refused.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut bytes, olpc_cjson::CanonicalFormatter::new());
    value
        .serialize(&mut ser)
        .map_err(|e| Error::malformed(format!("no canonical JSON form: {e}")))?;
    Ok(bytes)
}

impl Envelope {
    /// An unsigned envelope around `document`.
    pub fn new<T: Serialize>(document: &T) -> Result<Envelope> {
        let signed = serde_json::to_value(document)
            .map_err(|e| Error::malformed(format!("cannot serialize the document: {e}")))?;
        canonical_json(&signed)?;
        Ok(Envelope {
            signed,
            signatures: Vec::new(),
        })
    }

    /// Parses an envelope's bytes (no signature is checked yet).
    pub fn parse(bytes: &[u8]) -> Result<Envelope> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::malformed(format!("signed metadata does not parse: {e}")))
    }

    /// Adds (or replaces) `key`'s signature.
    pub fn sign(&mut self, key: &KeyPair) -> Result<()> {
        let message = canonical_json(&self.signed)?;
        let keyid = key.public().key_id();
        self.signatures.retain(|s| s.keyid != keyid);
        self.signatures.push(Signature {
            sig: hex::encode(key.sign(&message)),
            keyid,
        });
        Ok(())
    }

    /// Checks that at least `trust`'s threshold of distinct trusted keys signed, then reads
    /// the document as `T`. Signatures by unknown keys, repeated key ids and bad
    /// signatures count for nothing.
    pub fn verify<T: for<'de> Deserialize<'de>>(&self, trust: &Trust) -> Result<T> {
        let message = canonical_json(&self.signed)?;
        let mut valid = BTreeSet::new();
        for s in &self.signatures {
            let (Some(key), Ok(sig)) = (trust.key(&s.keyid), hex::decode(&s.sig)) else {
                continue;
            };
            if key.verifies(&message, &sig) {
                valid.insert(s.keyid.as_str());
            }
        }
        if valid.len() < trust.threshold() {
            return Err(Error::Signature {
                valid: valid.len(),
                threshold: trust.threshold(),
            });
        }
        self.read()
    }

    /// Reads the document without checking signatures: for `inspect` and for signing,
    /// never for trusting it.
    pub fn read<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        T::deserialize(&self.signed).map_err(|e| Error::malformed(format!("signed document: {e}")))
    }

    /// The envelope's JSON bytes (pretty-printed; signatures cover `signed`'s canonical
    /// form, not these bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// The RFC 3339 date (UTC, whole seconds) `valid_for` from `now`: signed metadata's
/// `expires`.
pub fn expires_after(now: std::time::SystemTime, valid_for: std::time::Duration) -> Result<String> {
    time::OffsetDateTime::from(now + valid_for)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::InvalidOption {
            reason: format!("expiry date: {e}"),
        })
}

/// [`Error::Expired`] when `now` is at or past `expires` (RFC 3339); [`Error::Malformed`]
/// when it is not a date.
pub fn check_expiry(expires: &str, now: std::time::SystemTime) -> Result<()> {
    let at = time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::malformed(format!("expires {expires:?}: {e}")))?;
    if time::OffsetDateTime::from(now) >= at {
        return Err(Error::Expired {
            expires: expires.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    #[test]
    fn canonical_json_sorts_keys_and_refuses_floats() {
        let v = serde_json::json!({"b": 1, "a": [true, "x\"y"], "c": {"z": null, "y": -2}});
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            r#"{"a":[true,"x\"y"],"b":1,"c":{"y":-2,"z":null}}"#
        );
        assert_eq!(
            canonical_json(&serde_json::json!({"f": 0.5}))
                .unwrap_err()
                .kind(),
            "malformed"
        );
    }

    #[test]
    fn thresholds_count_distinct_trusted_valid_signatures() {
        let (a, b, c) = (
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
        );
        let trust = Trust::new([a.public(), b.public()], 2).unwrap();
        let mut env = Envelope::new(&serde_json::json!({"version": 3})).unwrap();
        let check = |env: &Envelope| {
            env.verify::<serde_json::Value>(&trust)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(check(&env).unwrap_err().contains("0 valid"));
        env.sign(&a).unwrap();
        env.sign(&a).unwrap(); // re-signing replaces, never counts twice
        assert_eq!(env.signatures.len(), 1);
        let mut doubled = env.clone();
        doubled.signatures.push(env.signatures[0].clone());
        assert!(check(&doubled).unwrap_err().contains("1 valid"));
        env.sign(&c).unwrap(); // untrusted
        assert!(check(&env).unwrap_err().contains("1 valid"));
        env.sign(&b).unwrap();
        check(&env).unwrap();
        // Any change to the document voids every signature.
        let mut tampered = Envelope::parse(&env.to_bytes()).unwrap();
        tampered.signed["version"] = serde_json::json!(4);
        assert!(check(&tampered).unwrap_err().contains("0 valid"));
        // A signature moved to another key id counts for nothing.
        let mut swapped = env.clone();
        swapped
            .signatures
            .retain(|s| s.keyid != b.public().key_id());
        swapped.signatures[0].keyid = b.public().key_id();
        assert!(check(&swapped).is_err());
    }
}

//! ed25519 keys in TUF's key format.
//!
//! A public key is TUF's key object, `{"keytype": "ed25519", "scheme": "ed25519",
//! "keyval": {"public": HEX}}`; its key id is the SHA-256 of that object's canonical JSON,
//! as TUF computes it. A key pair file adds `"private": HEX` (the 32-byte seed) and is
//! written readable by its owner only.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::signed::canonical_json;

/// The largest key file read (a key is about 200 bytes).
const MAX_KEY_FILE: u64 = 64 * 1024;

/// The key type and signature scheme tern signs with.
const ED25519: &str = "ed25519";

/// TUF's serialized key: type, scheme and values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyObject {
    keytype: String,
    scheme: String,
    keyval: KeyVal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyVal {
    public: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    private: Option<String>,
}

/// A key's id: the lowercase hex SHA-256 of its public key object's canonical JSON.
pub type KeyId = String;

/// An ed25519 public key: what a device trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl PublicKey {
    /// The key as TUF's key object (JSON).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.object()).unwrap_or(serde_json::Value::Null)
    }

    /// Reads TUF's key object; a key pair file is accepted too (its private part is ignored).
    pub fn from_json(bytes: &[u8]) -> Result<PublicKey> {
        let object: KeyObject = serde_json::from_slice(bytes).map_err(|e| Error::Key {
            reason: format!("not a TUF key object: {e}"),
        })?;
        PublicKey::from_object(&object)
    }

    /// Reads a public key (or key pair) file.
    pub fn read(path: &Path) -> Result<PublicKey> {
        PublicKey::from_json(&read_key_file(path)?)
    }

    /// The key's id (see the module docs).
    pub fn key_id(&self) -> KeyId {
        let bytes = canonical_json(&self.object()).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }

    /// Whether `signature` is this key's signature of `message` (strict RFC 8032 checks:
    /// no malleable or small-order forms).
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        self.key.verify_strict(message, &signature).is_ok()
    }

    fn object(&self) -> KeyObject {
        KeyObject {
            keytype: ED25519.into(),
            scheme: ED25519.into(),
            keyval: KeyVal {
                public: hex::encode(self.key.as_bytes()),
                private: None,
            },
        }
    }

    fn from_object(object: &KeyObject) -> Result<PublicKey> {
        if object.keytype != ED25519 || object.scheme != ED25519 {
            return Err(Error::Key {
                reason: format!(
                    "keytype {:?} / scheme {:?}: only ed25519 is supported",
                    object.keytype, object.scheme
                ),
            });
        }
        let bytes = decode_32(&object.keyval.public, "public key")?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| Error::Key {
            reason: format!("not an ed25519 public key: {e}"),
        })?;
        Ok(PublicKey { key })
    }
}

/// An ed25519 key pair: what a publisher signs with. Never ships to devices.
pub struct KeyPair {
    signing: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_id", &self.public().key_id())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A new key pair from the operating system's random generator.
    pub fn generate() -> Result<KeyPair> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| Error::Key {
            reason: format!("no randomness from the OS: {e}"),
        })?;
        Ok(KeyPair {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.signing.verifying_key(),
        }
    }

    /// Signs `message` (64 bytes).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The key pair file's JSON (TUF's key object with the private seed).
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = self.public().object();
        object.keyval.private = Some(hex::encode(self.signing.to_bytes()));
        serde_json::to_value(object).unwrap_or(serde_json::Value::Null)
    }

    /// Reads a key pair file's bytes; the public key in it must be the seed's.
    pub fn from_json(bytes: &[u8]) -> Result<KeyPair> {
        let object: KeyObject = serde_json::from_slice(bytes).map_err(|e| Error::Key {
            reason: format!("not a key pair file: {e}"),
        })?;
        let public = PublicKey::from_object(&object)?;
        let seed = object.keyval.private.as_deref().ok_or_else(|| Error::Key {
            reason: "a public key, not a key pair: no \"private\" value".into(),
        })?;
        let pair = KeyPair {
            signing: SigningKey::from_bytes(&decode_32(seed, "private key")?),
        };
        if pair.public() != public {
            return Err(Error::Key {
                reason: "the public key does not belong to the private key".into(),
            });
        }
        Ok(pair)
    }

    /// Reads a key pair file.
    pub fn read(path: &Path) -> Result<KeyPair> {
        KeyPair::from_json(&read_key_file(path)?)
    }

    /// Writes the key pair file (owner read/write only on Unix), failing if it exists.
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(Error::io(path))?;
        let text = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        file.write_all(text.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(Error::io(path))
    }
}

/// The keys a device trusts for a role, and how many of them must sign.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: BTreeMap<KeyId, PublicKey>,
    threshold: usize,
}

impl Trust {
    /// Trusts `keys`, `threshold` of which must sign (at least 1, at most the number of keys).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>, threshold: usize) -> Result<Trust> {
        let keys: BTreeMap<KeyId, PublicKey> = keys.into_iter().map(|k| (k.key_id(), k)).collect();
        if threshold == 0 || threshold > keys.len() {
            return Err(Error::InvalidOption {
                reason: format!(
                    "a threshold of {threshold} with {} distinct key(s)",
                    keys.len()
                ),
            });
        }
        Ok(Trust { keys, threshold })
    }

    /// The trusted key with this id.
    pub fn key(&self, id: &str) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    /// How many distinct trusted keys must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }
}

fn decode_32(text: &str, what: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text).map_err(|e| Error::Key {
        reason: format!("{what} is not hex: {e}"),
    })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| Error::Key {
        reason: format!("{what} is {} bytes, not 32", bytes.len()),
    })
}

fn read_key_file(path: &Path) -> Result<Vec<u8>> {
    tern::fs::read_regular(path, MAX_KEY_FILE).map_err(Error::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pairs_round_trip_and_sign() {
        let pair = KeyPair::generate().unwrap();
        let text = serde_json::to_vec(&pair.to_json()).unwrap();
        let back = KeyPair::from_json(&text).unwrap();
        assert_eq!(back.public(), pair.public());
        let public =
            PublicKey::from_json(&serde_json::to_vec(&pair.public().to_json()).unwrap()).unwrap();
        assert_eq!(public.key_id(), pair.public().key_id());
        assert_eq!(public.key_id().len(), 64);
        let sig = pair.sign(b"model");
        assert!(public.verifies(b"model", &sig));
        assert!(!public.verifies(b"modem", &sig));
        assert!(!public.verifies(b"model", &sig[..63]));
        let other = KeyPair::generate().unwrap();
        assert!(!other.public().verifies(b"model", &sig));
    }

    #[test]
    fn bad_keys_are_typed_errors() {
        let pair = KeyPair::generate().unwrap();
        let mut json = pair.to_json();
        json["keyval"]["public"] =
            KeyPair::generate().unwrap().public().to_json()["keyval"]["public"].clone();
        let err = KeyPair::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert_eq!(err.kind(), "key", "{err}");
        for bad in [
            r#"{"keytype":"rsa","scheme":"rsassa-pss-sha256","keyval":{"public":"00"}}"#,
            r#"{"keytype":"ed25519","scheme":"ed25519","keyval":{"public":"zz"}}"#,
            r#"{"keytype":"ed25519","scheme":"ed25519","keyval":{"public":"0011"}}"#,
            r#"not json"#,
        ] {
            assert_eq!(
                PublicKey::from_json(bad.as_bytes()).unwrap_err().kind(),
                "key"
            );
        }
        let public_only = serde_json::to_vec(&pair.public().to_json()).unwrap();
        assert_eq!(KeyPair::from_json(&public_only).unwrap_err().kind(), "key");
        assert_eq!(
            Trust::new([pair.public()], 2).unwrap_err().kind(),
            "invalid_option"
        );
        assert_eq!(
            Trust::new([pair.public(), pair.public()], 2)
                .unwrap_err()
                .kind(),
            "invalid_option"
        );
    }
}

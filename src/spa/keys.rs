//! A user's two SPA keys, as fwknop writes them (`KEY_BASE64`,
//! `HMAC_KEY_BASE64`), with the HMAC state made once.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::rotating::{write_new_secret, Secret, SecretError};

/// The encryption key and the HMAC key of one user; never printed.
#[derive(Clone)]
pub struct Keys {
    cipher_key: Vec<u8>,
    /// Keyed once: each check clones it rather than hashing the key again.
    hmac: Hmac<Sha256>,
    /// For comparing configurations across reloads.
    hmac_key: Vec<u8>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl PartialEq for Keys {
    fn eq(&self, other: &Self) -> bool {
        self.cipher_key == other.cipher_key && self.hmac_key == other.hmac_key
    }
}

impl Eq for Keys {}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    File(#[from] SecretError),
    #[error("key file {}: not base64 (fwknop --key-gen and knockq keygen --spa write one)", .0.display())]
    NotBase64(PathBuf),
    #[error("key file {}: an encryption key must be 1 to 32 bytes, this one is {len}", path.display())]
    KeyLength { path: PathBuf, len: usize },
}

impl Keys {
    /// Keys from raw bytes: an AES key of at most 32 bytes, an HMAC key of
    /// any length.
    pub fn new(cipher_key: &[u8], hmac_key: &[u8]) -> Self {
        Keys {
            cipher_key: cipher_key.to_vec(),
            hmac: Hmac::new_from_slice(hmac_key).expect("HMAC takes keys of any length"),
            hmac_key: hmac_key.to_vec(),
        }
    }

    /// Reads the two base64 key files, each mode 0600 or stricter.
    pub fn load(key_file: &Path, hmac_key_file: &Path) -> Result<Self, KeyError> {
        let cipher_key = read_base64(key_file)?;
        if cipher_key.is_empty() || cipher_key.len() > 32 {
            return Err(KeyError::KeyLength {
                path: key_file.to_owned(),
                len: cipher_key.len(),
            });
        }
        Ok(Keys::new(&cipher_key, &read_base64(hmac_key_file)?))
    }

    /// New random keys of fwknop's default sizes (32 and 64 bytes), written
    /// as base64 to two new files, mode 0600; returns their base64 text.
    pub fn generate(key_file: &Path, hmac_key_file: &Path) -> Result<(String, String), KeyError> {
        let mut cipher_key = [0u8; 32];
        let mut hmac_key = [0u8; 64];
        for bytes in [&mut cipher_key[..], &mut hmac_key[..]] {
            getrandom::fill(bytes).map_err(|e| SecretError::Random(e.to_string()))?;
        }
        let texts = (
            super::base64_encode(&cipher_key),
            super::base64_encode(&hmac_key),
        );
        write_new_secret(key_file, &format!("{}\n", texts.0))?;
        write_new_secret(hmac_key_file, &format!("{}\n", texts.1))?;
        Ok(texts)
    }

    pub(super) fn cipher_key(&self) -> &[u8] {
        &self.cipher_key
    }

    pub(super) fn hmac(&self) -> &Hmac<Sha256> {
        &self.hmac
    }
}

fn read_base64(path: &Path) -> Result<Vec<u8>, KeyError> {
    let secret = Secret::load(path)?;
    super::base64_decode(secret.bytes()).ok_or_else(|| KeyError::NotBase64(path.to_owned()))
}

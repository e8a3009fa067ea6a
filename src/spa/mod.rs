//! Single packet authorization in fwknop's wire format (its Rijndael and
//! HMAC mode), both ways: [`open`] for the gate, [`seal`] for the client.
//! Pure: keys, bytes and times in, messages out; the engine decides what a
//! message grants (`engine::spa`).
//!
//! A datagram is text: the base64 (no `=`) of `Salted__`, an 8-byte salt
//! and the AES-256-CBC ciphertext, with its first 10 characters (the base64
//! of `Salted__`) cut off, then the 43-character base64 HMAC-SHA256 of the
//! whole base64 ciphertext, prefix included. The key and IV come from the
//! key and the salt by OpenSSL's `EVP_BytesToKey` (MD5, one round). The
//! plaintext is `:`-separated fields, the last a base64 digest of the rest.
//!
//! Every cipher, MAC and digest is RustCrypto's; only the framing, which no
//! crate implements, is written here.

mod keys;
mod message;

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::Mac;
use md5::{Digest, Md5};

pub use keys::{KeyError, Keys};
pub use message::{Access, Message, MessageType, Refusal};

/// fwknop's default SPA port.
pub const DEFAULT_PORT: u16 = 62201;
/// The shortest and longest datagrams fwknop's clients send.
pub const MIN_DATAGRAM: usize = 140;
pub const MAX_DATAGRAM: usize = 1500;
/// The base64 of `Salted__`, which the wire leaves out.
pub const SALTED_PREFIX: &[u8] = b"U2FsdGVkX1";
/// Length of the base64 HMAC-SHA256 at the end of a datagram.
pub const HMAC_LEN: usize = 43;

/// fwknop's base64: the standard alphabet, written without `=`, read with
/// or without it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

/// Whether `datagram` carries a valid HMAC under `keys`: the first check,
/// cheap and in constant time, before anything is decrypted. Anything that
/// is not base64 text of the right shape fails it.
pub fn authentic(datagram: &[u8], keys: &Keys) -> bool {
    let Some((body, tag)) = split(datagram) else {
        return false;
    };
    let mut decoded = [0u8; 32];
    // A tag that is not the canonical base64 of 32 bytes matches nothing.
    if BASE64.decode_slice(tag, &mut decoded) != Ok(32) {
        return false;
    }
    let mut mac = keys.hmac().clone();
    mac.update(SALTED_PREFIX);
    mac.update(body);
    mac.verify_slice(&decoded).is_ok()
}

/// The message in an authentic datagram (see [`authentic`]): decrypted,
/// its digest checked and its fields read. A datagram that still begins
/// with the `Salted__` prefix is refused: fwknop's clients never send one,
/// and the same packet in two spellings would slip past replay checks.
pub fn open(datagram: &[u8], keys: &Keys) -> Result<Message, Refusal> {
    let (body, _) = split(datagram).ok_or(Refusal::Malformed("too short"))?;
    if body.starts_with(SALTED_PREFIX) {
        return Err(Refusal::Malformed("begins with the Salted__ prefix"));
    }
    let mut text = Vec::with_capacity(SALTED_PREFIX.len() + body.len());
    text.extend_from_slice(SALTED_PREFIX);
    text.extend_from_slice(body);
    let blob = BASE64
        .decode(&text)
        .map_err(|_| Refusal::Malformed("not base64"))?;
    if blob.len() < 32 || !blob.starts_with(b"Salted__") || (blob.len() - 16) % 16 != 0 {
        return Err(Refusal::Malformed("not a salted AES-CBC ciphertext"));
    }
    let salt: [u8; 8] = blob[8..16].try_into().expect("8 bytes");
    let (key, iv) = key_and_iv(keys.cipher_key(), &salt);
    let plain = Aes256CbcDec::new(&key.into(), &iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(&blob[16..])
        .map_err(|_| Refusal::Malformed("bad padding"))?;
    Message::decode(&plain)
}

/// The datagram fwknop's client would send for `message` under `keys`,
/// with `salt` (8 random bytes) for the key derivation.
pub fn seal(message: &Message, keys: &Keys, salt: [u8; 8]) -> String {
    let plain = message.encode();
    let (key, iv) = key_and_iv(keys.cipher_key(), &salt);
    let ciphertext =
        Aes256CbcEnc::new(&key.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(&plain);
    let mut blob = Vec::with_capacity(16 + ciphertext.len());
    blob.extend_from_slice(b"Salted__");
    blob.extend_from_slice(&salt);
    blob.extend_from_slice(&ciphertext);
    let text = BASE64.encode(blob);
    let mut mac = keys.hmac().clone();
    mac.update(text.as_bytes());
    let tag = BASE64.encode(mac.finalize().into_bytes());
    let mut datagram = text[SALTED_PREFIX.len()..].to_owned();
    datagram.push_str(&tag);
    datagram
}

/// The base64 ciphertext and the HMAC of a datagram.
fn split(datagram: &[u8]) -> Option<(&[u8], &[u8])> {
    if !(MIN_DATAGRAM..=MAX_DATAGRAM).contains(&datagram.len()) {
        return None;
    }
    Some(datagram.split_at(datagram.len() - HMAC_LEN))
}

/// OpenSSL's `EVP_BytesToKey` with MD5 and one round, as fwknop uses it:
/// D1 = MD5(key ‖ salt), Di = MD5(Di-1 ‖ key ‖ salt); the first 32 bytes
/// are the AES-256 key, the next 16 the IV.
fn key_and_iv(key: &[u8], salt: &[u8; 8]) -> ([u8; 32], [u8; 16]) {
    let mut derived = [0u8; 48];
    let mut previous: Option<[u8; 16]> = None;
    for chunk in derived.chunks_mut(16) {
        let mut md5 = Md5::new();
        if let Some(previous) = previous {
            md5.update(previous);
        }
        md5.update(key);
        md5.update(salt);
        let digest: [u8; 16] = md5.finalize().into();
        chunk.copy_from_slice(&digest);
        previous = Some(digest);
    }
    let key = derived[..32].try_into().expect("32 bytes");
    let iv = derived[32..].try_into().expect("16 bytes");
    (key, iv)
}

/// fwknop's base64, for the message fields and the key files.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

pub(crate) fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

#[cfg(test)]
mod tests;

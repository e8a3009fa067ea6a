//! The format against packets made by fwknop's own client (2.6.10, `-T -B`):
//! `tests/testdata/spa/`, with the keys `fwknop --key-gen` printed.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::flow::FlowPort;

fn testdata(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/spa/");
    std::fs::read_to_string(format!("{path}{name}")).unwrap()
}

fn fwknop_keys() -> Keys {
    let text = testdata("fwknop-keys.txt");
    let field = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        base64_decode(line.split_once(' ').unwrap().1.as_bytes()).unwrap()
    };
    Keys::new(&field("KEY_BASE64:"), &field("HMAC_KEY_BASE64:"))
}

fn packet(name: &str) -> Vec<u8> {
    testdata(name).trim_end().as_bytes().to_vec()
}

#[test]
fn reads_an_access_message_from_fwknops_client() {
    let keys = fwknop_keys();
    let datagram = packet("alice-access.txt");
    assert!(authentic(&datagram, &keys));
    let message = open(&datagram, &keys).unwrap();
    assert_eq!(
        message,
        Message {
            random: "8994274262113725".into(),
            user: "alice".into(),
            timestamp: 1796653647,
            version: "3.0.0".into(),
            access: Access {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                ports: vec![FlowPort::tcp(22)],
            },
            timeout: None,
        }
    );
}

#[test]
fn reads_a_timeout_message_for_any_source() {
    let keys = fwknop_keys();
    let datagram = packet("bob-timeout-any-source.txt");
    let message = open(&datagram, &keys).unwrap();
    assert_eq!(message.user, "bob");
    assert!(message.access.any_source());
    assert_eq!(
        message.access.ports,
        vec![FlowPort::tcp(22), FlowPort::udp(53)]
    );
    assert_eq!(message.timeout, Some(5));
}

#[test]
fn what_knockq_seals_reads_back_the_same() {
    let keys = fwknop_keys();
    let original = open(&packet("bob-timeout-any-source.txt"), &keys).unwrap();
    let datagram = seal(&original, &keys, [7; 8]);
    assert!(!datagram.starts_with("U2FsdGVkX1"));
    assert!(authentic(datagram.as_bytes(), &keys));
    assert_eq!(open(datagram.as_bytes(), &keys).unwrap(), original);
}

#[test]
fn a_wrong_hmac_key_or_any_flipped_byte_fails_the_hmac() {
    let keys = fwknop_keys();
    let datagram = packet("alice-access.txt");
    let other = Keys::new(b"0123456789abcdef0123456789abcdef", b"another hmac key");
    assert!(!authentic(&datagram, &other));
    for i in 0..datagram.len() {
        let mut flipped = datagram.clone();
        flipped[i] ^= 0x01;
        assert!(!authentic(&flipped, &keys), "byte {i} flipped still passes");
    }
}

#[test]
fn short_long_and_random_datagrams_fail_the_hmac() {
    let keys = fwknop_keys();
    let datagram = packet("alice-access.txt");
    assert!(!authentic(&datagram[..datagram.len() - 1], &keys));
    assert!(!authentic(&datagram[1..], &keys));
    assert!(!authentic(&[b'A'; MAX_DATAGRAM + 1], &keys));
    assert!(!authentic(&[], &keys));
    let mut random = vec![0u8; 1500];
    getrandom::fill(&mut random).unwrap();
    assert!(!authentic(&random, &keys));
}

#[test]
fn a_wrong_encryption_key_with_the_right_hmac_key_is_malformed() {
    let datagram = packet("alice-access.txt");
    let text = testdata("fwknop-keys.txt");
    let line = text
        .lines()
        .find(|l| l.starts_with("HMAC_KEY_BASE64:"))
        .unwrap();
    let hmac_key = base64_decode(line.split_once(' ').unwrap().1.as_bytes()).unwrap();
    let wrong = Keys::new(b"0123456789abcdef0123456789abcdef", &hmac_key);
    assert!(authentic(&datagram, &wrong));
    assert!(matches!(
        open(&datagram, &wrong),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn a_packet_with_the_salted_prefix_left_on_is_refused() {
    let keys = fwknop_keys();
    let datagram = packet("alice-access.txt");
    let mut prefixed = SALTED_PREFIX.to_vec();
    prefixed.extend_from_slice(&datagram);
    assert!(matches!(open(&prefixed, &keys), Err(Refusal::Malformed(_))));
}

/// `plain` with its digest, sealed as a client would.
fn sealed_plaintext(plain: &str, keys: &Keys) -> Vec<u8> {
    sealed_text(
        &format!("{plain}:{}", base64_encode(&sha2::Sha256::digest(plain))),
        keys,
    )
}

/// `text`, digest and all, sealed as a client would.
fn sealed_text(text: &str, keys: &Keys) -> Vec<u8> {
    let salt = [1; 8];
    let (key, iv) = key_and_iv(keys.cipher_key(), &salt);
    let ciphertext =
        Aes256CbcEnc::new(&key.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(text.as_bytes());
    let mut blob = b"Salted__".to_vec();
    blob.extend_from_slice(&salt);
    blob.extend_from_slice(&ciphertext);
    let text = BASE64.encode(blob);
    let mut mac = keys.hmac().clone();
    mac.update(text.as_bytes());
    let mut datagram = text[SALTED_PREFIX.len()..].to_owned();
    datagram.push_str(&BASE64.encode(mac.finalize().into_bytes()));
    datagram.into_bytes()
}

#[test]
fn command_and_nat_messages_are_refused_by_type() {
    let keys = fwknop_keys();
    let user = base64_encode(b"alice");
    let access = base64_encode(b"10.0.0.2,tcp/22");
    let nat = base64_encode(b"192.168.1.2,22");
    let cases = [
        (
            format!(
                "1234567890123456:{user}:1796653647:3.0.0:0:{}",
                base64_encode(b"10.0.0.2,echo hi")
            ),
            MessageType::Command,
        ),
        (
            format!("1234567890123456:{user}:1796653647:3.0.0:2:{access}:{nat}"),
            MessageType::NatAccess,
        ),
        (
            format!("1234567890123456:{user}:1796653647:3.0.0:4:{access}:{nat}:30"),
            MessageType::ClientTimeoutNatAccess,
        ),
        (
            format!("1234567890123456:{user}:1796653647:3.0.0:5:{access}:{nat}"),
            MessageType::LocalNatAccess,
        ),
        (
            format!("1234567890123456:{user}:1796653647:3.0.0:6:{access}:{nat}:30"),
            MessageType::ClientTimeoutLocalNatAccess,
        ),
    ];
    for (plain, kind) in cases {
        let datagram = sealed_plaintext(&plain, &keys);
        assert!(authentic(&datagram, &keys));
        assert_eq!(open(&datagram, &keys), Err(Refusal::Type(kind)), "{plain}");
    }
}

#[test]
fn malformed_plaintexts_are_refused() {
    let keys = fwknop_keys();
    let user = base64_encode(b"alice");
    let access = base64_encode(b"10.0.0.2,tcp/22");
    let plains = [
        format!("12345:{user}:1796653647:3.0.0:1:{access}"),
        format!("1234567890123456:{user}:soon:3.0.0:1:{access}"),
        format!("1234567890123456:{user}:1796653647:3.0.0:9:{access}"),
        format!(
            "1234567890123456:{user}:1796653647:3.0.0:1:{}",
            base64_encode(b"10.0.0.2,sctp/22")
        ),
        format!(
            "1234567890123456:{user}:1796653647:3.0.0:1:{}",
            base64_encode(b"10.0.0.2")
        ),
        format!("1234567890123456:{user}:1796653647:3.0.0:3:{access}"),
        format!("1234567890123456:{user}:1796653647:3.0.0:1"),
    ];
    for plain in plains {
        let datagram = sealed_plaintext(&plain, &keys);
        assert!(
            matches!(open(&datagram, &keys), Err(Refusal::Malformed(_))),
            "{plain}"
        );
    }
    // A digest that does not match its fields.
    let plain = format!("1234567890123456:{user}:1796653647:3.0.0:1:{access}");
    assert!(open(&sealed_plaintext(&plain, &keys), &keys).is_ok());
    let wrong = format!("{plain}:{}", base64_encode(&sha2::Sha256::digest("other")));
    assert_eq!(
        open(&sealed_text(&wrong, &keys), &keys),
        Err(Refusal::Malformed("digest does not match"))
    );
}

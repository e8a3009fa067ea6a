//! Property tests over arbitrary input: the packet parser, the configuration
//! loader and the engine never panic, and the engine's table never passes
//! its cap.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use knockq::engine::{Engine, Event, NewFlow, TablePart, Timestamp};
use knockq::loader;
use knockq::packet::{self, Link};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../examples/knockq.toml");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = packet::parse_new_flow(&bytes);
        for link in [Link::Ethernet, Link::LinuxSll, Link::LinuxSll2, Link::RawIp] {
            let _ = packet::parse_frame(link, &bytes);
        }
    }

    #[test]
    fn ip_headers_with_any_tail_parse_or_are_refused(
        version in prop_oneof![Just(0x45u8), Just(0x46), Just(0x60)],
        bytes in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut packet = vec![version];
        packet.extend(bytes);
        let _ = packet::parse_new_flow(&packet);
    }

    #[test]
    fn any_text_loads_or_gets_a_one_line_error(text in "\\PC{0,300}") {
        if let Err(e) = loader::parse(&text, Path::new("fuzz.toml")) {
            let message = e.to_string();
            prop_assert!(message.starts_with("fuzz.toml"), "{}", message);
            prop_assert!(!message.contains('\n'), "{}", message);
        }
    }

    #[test]
    fn a_damaged_example_loads_or_gets_a_one_line_error(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..8),
    ) {
        let mut text: Vec<char> = EXAMPLE.chars().collect();
        for (at, c) in edits {
            let i = at.index(text.len());
            text[i] = c;
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = loader::parse(&text, Path::new("fuzz.toml")) {
            prop_assert!(!e.to_string().contains('\n'), "{}", e);
        }
    }

    #[test]
    fn the_engine_takes_any_traffic_within_its_cap(
        syns in proptest::collection::vec((0u32..64, prop_oneof![Just(1111u16), Just(2222), Just(3333), Just(22), any::<u16>()], 0u64..3000), 1..400),
    ) {
        let text = EXAMPLE.replace("max_sources = 1000000", "max_sources = 16");
        let engine = Engine::new(&loader::parse(&text, Path::new("k.toml")).unwrap());
        let mut now = 0;
        let mut events: Vec<Event> = Vec::new();
        for (source, dst_port, gap) in syns {
            now += gap;
            let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + source));
            let _ = engine.decide(NewFlow { src, dst_port: knockq::flow::FlowPort::tcp(dst_port) }, &[], Timestamp::from_millis(now), &mut events, &mut knockq::engine::NoScripts);
            prop_assert!(engine.tracked_sources() <= 16);
            if now % 7 == 0 {
                engine.expire(Timestamp::from_millis(now), TablePart::WHOLE, &mut events);
            }
        }
    }
}

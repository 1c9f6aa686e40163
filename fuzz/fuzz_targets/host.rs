//! Host canonicalisation over arbitrary text: no panic, and a canonical name is a fixed
//! point (the agent checks `canonical_host(site) == site`), plain lower-case LDH, not an IP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_proto::canonical_host;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(host) = canonical_host(raw) {
        assert_eq!(canonical_host(&host).as_deref(), Ok(host.as_str()), "not a fixed point: {raw:?}");
        assert!(!host.is_empty() && host.len() <= 253, "{host:?}");
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)),
            "{host:?}"
        );
        assert!(host.parse::<std::net::Ipv4Addr>().is_err(), "{host:?}");
    }
});

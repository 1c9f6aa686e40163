//! `X-Forwarded-For`, `-Proto` and `-Host` toward agents.
//!
//! A client can write anything into these headers, so the ones that arrive are believed only
//! when the TCP peer is a configured trusted load balancer (`trusted_proxies`, CIDRs): then
//! the peer's address is appended to the chain it sent, and its `-Proto`/`-Host` are kept.
//! From anyone else they are replaced, as are `Forwarded` and `X-Real-IP`, which an app
//! might otherwise believe.

use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 (/128).
/// An IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, from a dual-stack listener) matches as the
/// IPv4 address it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !s.contains('/') {
            let addr: IpAddr = s
                .parse()
                .map_err(|_| format!("{s:?} is not an IP address"))?;
            return Ok(Cidr(IpNet::from(addr)));
        }
        s.parse()
            .map(Cidr)
            .map_err(|_| format!("{s:?} is not an address block (ADDRESS/PREFIX)"))
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

pub fn is_trusted(trusted: &[Cidr], ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| trusted.iter().any(|c| c.contains(ip)))
}

/// The values to send upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub xff: String,
    pub proto: &'static str,
    pub host: String,
    /// The original client as far as trusted hops tell: for the log line.
    pub client: String,
}

fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Work out the forwarded headers for a request from `peer` (the TCP peer), over TLS or not,
/// asking for `host` (the Host header as sent, already validated).
pub fn forwarded(
    trusted: &[Cidr],
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    tls: bool,
    host: &str,
) -> Forwarded {
    let peer = peer.map(|p| p.to_canonical());
    let peer_text = peer
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let own_proto = if tls { "https" } else { "http" };
    if !is_trusted(trusted, peer) {
        return Forwarded {
            xff: peer_text.clone(),
            proto: own_proto,
            host: host.to_string(),
            client: peer_text,
        };
    }
    let chain = header_values(headers, "x-forwarded-for");
    // The client is the rightmost address that is not one of our trusted hops.
    let client = chain
        .iter()
        .rev()
        .find(|a| {
            !a.parse::<IpAddr>()
                .is_ok_and(|ip| is_trusted(trusted, Some(ip)))
        })
        .cloned()
        .or_else(|| chain.first().cloned())
        .unwrap_or_else(|| peer_text.clone());
    let mut xff = chain.join(", ");
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(&peer_text);
    let proto = match header_values(headers, "x-forwarded-proto")
        .first()
        .map(|s| s.to_ascii_lowercase())
    {
        Some(p) if p == "https" => "https",
        Some(p) if p == "http" => "http",
        _ => own_proto,
    };
    let fwd_host = header_values(headers, "x-forwarded-host")
        .into_iter()
        .next()
        .filter(|h| roost_proto::canonical_host(h).is_ok())
        .unwrap_or_else(|| host.to_string());
    Forwarded {
        xff,
        proto,
        host: fwd_host,
        client,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn untrusted_peers_cannot_forge() {
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ]);
        let f = forwarded(
            &cidrs(&["10.0.0.0/8"]),
            Some("1.2.3.4".parse().unwrap()),
            &h,
            false,
            "a.example",
        );
        assert_eq!(f.xff, "1.2.3.4");
        assert_eq!(f.proto, "http");
        assert_eq!(f.host, "a.example");
        assert_eq!(f.client, "1.2.3.4");
    }

    #[test]
    fn trusted_balancers_extend_the_chain() {
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.7"),
            ("x-forwarded-proto", "HTTPS"),
            ("x-forwarded-host", "www.a.example:443"),
        ]);
        let f = forwarded(
            &cidrs(&["10.0.0.0/8"]),
            Some("10.0.0.2".parse().unwrap()),
            &h,
            false,
            "a.example",
        );
        assert_eq!(f.xff, "6.6.6.6, 203.0.113.9, 10.0.0.7, 10.0.0.2");
        assert_eq!(f.proto, "https");
        assert_eq!(f.host, "www.a.example:443");
        assert_eq!(f.client, "203.0.113.9");
        // Nothing sent: the balancer itself is the client.
        let f = forwarded(
            &cidrs(&["10.0.0.0/8"]),
            Some("10.0.0.2".parse().unwrap()),
            &HeaderMap::new(),
            true,
            "a.example",
        );
        assert_eq!((f.xff.as_str(), f.proto), ("10.0.0.2", "https"));
    }
}

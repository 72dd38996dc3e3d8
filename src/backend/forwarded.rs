//! Who the client is: the socket peer or, when the peer is a trusted
//! proxy, the first address of `X-Forwarded-For` read from the right that
//! is not a trusted proxy itself (nginx's `real_ip_recursive on`), so the
//! ip cannot be spoofed by a client that writes its own chain. Also the
//! `X-Forwarded-For` and `X-Forwarded-Proto` the backend is sent.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// `X-Forwarded-For`, lowercase (as `http` names headers).
pub const XFF: &str = "x-forwarded-for";
/// `X-Forwarded-Proto`, lowercase.
pub const XFP: &str = "x-forwarded-proto";

/// An address as the trusted list and the rate limiter compare it: an
/// IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack `[::]`
/// listener reports for an IPv4 peer) is its IPv4 address, so
/// `10.0.0.0/8` in `trusted_proxies` covers it.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether the peer is one of the `trusted_proxies`.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = canonical(peer);
    trusted.iter().any(|net| net.contains(&peer))
}

/// Every `X-Forwarded-For` line of a request, in order, as one chain
/// (RFC 9110 section 5.3: repeated lines are one comma-separated list). A
/// proxy that adds its own line rather than extending the client's must
/// not leave the client's line to be read as the proxy's word. Bytes that
/// are not UTF-8 stay malformed and stop the walk. `None` when there is
/// none; borrowed when there is one line, the common case.
pub fn chain(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    let mut lines = headers.get_all(XFF).iter();
    let mut out = String::from_utf8_lossy(lines.next()?.as_bytes());
    for line in lines {
        let joined = out.to_mut();
        joined.push_str(", ");
        joined.push_str(&String::from_utf8_lossy(line.as_bytes()));
    }
    Some(out)
}

/// One hop of the chain: an ip, or an `ip:port` / `[ipv6]:port` as some
/// load balancers write it (the port is dropped). `None` when malformed.
fn hop(text: &str) -> Option<IpAddr> {
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .map(canonical)
}

/// The client ip of a request from `peer` (unspecified when the socket
/// gave none) with `headers`: [`client_ip`] over its [`chain`].
pub fn client_ip_of(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    // An untrusted peer is the client whatever its headers say, so their
    // chain (a header lookup by name, on every rule request) is read only
    // for a trusted one.
    if !is_trusted(peer, trusted) {
        return canonical(peer);
    }
    client_ip(peer, chain(headers).as_deref(), trusted)
}

/// The client ip for rate limiting. An untrusted peer is the client,
/// whatever it claims. A trusted peer's `X-Forwarded-For` is walked from
/// the right past every hop that is itself in `trusted_proxies`: the
/// first untrusted hop is the client; when every hop is trusted, the
/// leftmost is. A malformed hop stops the walk and the last trusted
/// address seen (a hop, or the peer) is the client, as nginx does: what
/// lies left of garbage was written by nobody we trust. Empty entries
/// (`a, , b`) carry nothing and are skipped.
pub fn client_ip(peer: IpAddr, xff: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    for text in xff.unwrap_or_default().rsplit(',') {
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let Some(ip) = hop(text) else {
            break;
        };
        client = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// The `X-Forwarded-For` to send upstream: the incoming chain plus the
/// peer when the peer is trusted; otherwise only the peer, since an
/// untrusted client's chain is whatever it chose to write.
pub fn forwarded_for(peer: IpAddr, xff: Option<&str>, trusted: &[IpNet]) -> String {
    let peer = canonical(peer);
    match xff {
        Some(chain) if is_trusted(peer, trusted) && !chain.trim().is_empty() => {
            format!("{}, {peer}", chain.trim())
        }
        _ => ip_text(peer),
    }
}

/// An address as text: an IPv4 one without the formatter, which costs
/// more than the rest of the header on every forwarded request
/// (callgrind); IPv6 as `Display` writes it.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(itoa::Buffer::new().format(octet));
    }
    out
}

/// The `X-Forwarded-For` and `-Proto` to send upstream for a request from
/// `peer` with `headers` ([`forwarded_for`], [`forwarded_proto`]). The
/// incoming ones are read only behind a trusted peer: an untrusted one's
/// are replaced unread, so the lookups by name are skipped for clients.
pub fn outgoing(
    peer: IpAddr,
    headers: &HeaderMap,
    tls: bool,
    trusted: &[IpNet],
) -> (String, &'static str) {
    let (xff, proto) = if is_trusted(peer, trusted) {
        let proto = headers.get(XFP).and_then(|v| v.to_str().ok());
        (chain(headers), proto)
    } else {
        (None, None)
    };
    (
        forwarded_for(peer, xff.as_deref(), trusted),
        forwarded_proto(peer, proto, tls, trusted),
    )
}

/// The `X-Forwarded-Proto` to send upstream: a trusted peer's own value
/// (it terminated the client's connection, so it knows the scheme); else
/// the scheme of the client's connection to the gateway, whatever the
/// client wrote.
pub fn forwarded_proto(
    peer: IpAddr,
    incoming: Option<&str>,
    tls: bool,
    trusted: &[IpNet],
) -> &'static str {
    match incoming.map(str::trim) {
        Some("https") if is_trusted(peer, trusted) => "https",
        Some("http") if is_trusted(peer, trusted) => "http",
        _ if tls => "https",
        _ => "http",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "10.1.2.3",
            "255.255.255.255",
            "192.168.0.10",
            "::1",
            "2001:db8::7",
        ] {
            assert_eq!(ip_text(ip(text)), ip(text).to_string());
        }
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let peer = ip("203.0.113.7");
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(peer, Some("1.2.3.4"), &trusted), peer);
        assert_eq!(client_ip(peer, Some("10.0.0.1"), &trusted), peer);
        assert_eq!(
            forwarded_for(peer, Some("1.2.3.4"), &trusted),
            "203.0.113.7"
        );
    }

    #[test]
    fn trusted_peer_passes_the_last_hop() {
        let peer = ip("10.1.2.3");
        let trusted = nets(&["10.0.0.0/8"]);
        let xff = Some("9.9.9.9, 198.51.100.4");
        assert_eq!(client_ip(peer, xff, &trusted), ip("198.51.100.4"));
        assert_eq!(
            forwarded_for(peer, xff, &trusted),
            "9.9.9.9, 198.51.100.4, 10.1.2.3"
        );
    }

    #[test]
    fn the_walk_goes_past_every_trusted_hop_to_the_first_untrusted_one() {
        let peer = ip("10.0.0.1");
        let trusted = nets(&["10.0.0.0/8", "192.168.7.0/24"]);
        // Client 198.51.100.4 -> LB 192.168.7.5 -> LB 10.0.0.9 -> peer
        // 10.0.0.1; 6.6.6.6 is what the client wrote itself.
        let xff = Some("6.6.6.6, 198.51.100.4, 192.168.7.5, 10.0.0.9");
        assert_eq!(client_ip(peer, xff, &trusted), ip("198.51.100.4"));
        // What a client prepends cannot move the answer.
        let spoofed = Some("1.1.1.1, 2.2.2.2, 198.51.100.4, 192.168.7.5, 10.0.0.9");
        assert_eq!(client_ip(peer, spoofed, &trusted), ip("198.51.100.4"));
    }

    #[test]
    fn every_hop_trusted_gives_the_leftmost() {
        let peer = ip("10.0.0.1");
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(peer, Some("10.9.9.9, 10.0.0.2"), &trusted),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn a_malformed_hop_stops_the_walk_at_the_last_trusted_address() {
        let peer = ip("10.0.0.1");
        let trusted = nets(&["10.0.0.0/8"]);
        // Garbage right after the peer: the peer itself.
        assert_eq!(client_ip(peer, Some("nonsense"), &trusted), peer);
        assert_eq!(client_ip(peer, Some("1.2.3.4, nonsense"), &trusted), peer);
        // Garbage after a trusted hop: that hop, never what lies left.
        assert_eq!(
            client_ip(peer, Some("1.2.3.4, unknown, 10.0.0.7"), &trusted),
            ip("10.0.0.7")
        );
        assert_eq!(client_ip(peer, None, &trusted), peer);
        assert_eq!(client_ip(peer, Some(""), &trusted), peer);
        assert_eq!(forwarded_for(peer, None, &trusted), "10.0.0.1");
    }

    #[test]
    fn empty_entries_are_skipped_and_ports_dropped() {
        let peer = ip("10.0.0.1");
        let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!(
            client_ip(peer, Some("198.51.100.4:51234, , 10.0.0.2 ,"), &trusted),
            ip("198.51.100.4")
        );
        assert_eq!(
            client_ip(peer, Some("[2001:db9::1]:443, [2001:db8::7]:80"), &trusted),
            ip("2001:db9::1")
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_compared_as_ipv4() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mapped = ip("::ffff:10.0.0.1");
        assert!(is_trusted(mapped, &trusted));
        assert_eq!(
            client_ip(
                mapped,
                Some("::ffff:198.51.100.4, ::ffff:10.0.0.2"),
                &trusted
            ),
            ip("198.51.100.4")
        );
        // An untrusted mapped peer is keyed as its IPv4 address, the same
        // bucket whichever way the listener reports it, and named so to
        // the backend.
        assert_eq!(
            client_ip(ip("::ffff:203.0.113.7"), None, &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            forwarded_for(ip("::ffff:203.0.113.7"), Some("1.2.3.4"), &trusted),
            "203.0.113.7"
        );
        assert_eq!(
            forwarded_for(mapped, Some("198.51.100.4"), &trusted),
            "198.51.100.4, 10.0.0.1"
        );
    }

    #[test]
    fn every_line_of_the_header_is_one_chain_in_order() {
        let mut headers = HeaderMap::new();
        assert_eq!(chain(&headers), None);
        headers.append(XFF, "6.6.6.6".parse().expect("value"));
        headers.append(XFF, "198.51.100.4, 10.0.0.2".parse().expect("value"));
        let joined = chain(&headers);
        assert_eq!(joined.as_deref(), Some("6.6.6.6, 198.51.100.4, 10.0.0.2"));
        // A proxy that appended its own line is read, not the client's first line.
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), joined.as_deref(), &trusted),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn client_ip_of_reads_the_headers_only_behind_a_trusted_peer() {
        let mut headers = HeaderMap::new();
        headers.append(XFF, "6.6.6.6, 198.51.100.4".parse().expect("value"));
        let trusted = nets(&["10.0.0.0/8"]);
        // A client's claim changes nothing; a mapped address is the IPv4 one.
        assert_eq!(
            client_ip_of(Some(ip("203.0.113.7")), &headers, &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip_of(Some(ip("::ffff:203.0.113.7")), &headers, &trusted),
            ip("203.0.113.7")
        );
        // Behind a trusted proxy, its last hop (also mapped or not).
        assert_eq!(
            client_ip_of(Some(ip("10.0.0.1")), &headers, &trusted),
            ip("198.51.100.4")
        );
        assert_eq!(
            client_ip_of(Some(ip("::ffff:10.0.0.1")), &headers, &trusted),
            ip("198.51.100.4")
        );
        // No socket address: unspecified, never a header's word.
        assert_eq!(
            client_ip_of(None, &headers, &trusted),
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn forwarded_proto_is_ours_unless_a_trusted_proxy_says_it() {
        let trusted = nets(&["10.0.0.0/8"]);
        let (client, proxy) = (ip("203.0.113.7"), ip("10.0.0.1"));
        assert_eq!(
            forwarded_proto(client, Some("https"), false, &trusted),
            "http"
        );
        assert_eq!(forwarded_proto(client, None, true, &trusted), "https");
        assert_eq!(
            forwarded_proto(client, Some("http"), true, &trusted),
            "https"
        );
        assert_eq!(
            forwarded_proto(proxy, Some("https"), false, &trusted),
            "https"
        );
        assert_eq!(
            forwarded_proto(proxy, Some("javascript"), false, &trusted),
            "http"
        );
        assert_eq!(forwarded_proto(proxy, None, true, &trusted), "https");
    }
}

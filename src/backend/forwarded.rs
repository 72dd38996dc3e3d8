//! Who the client is: the socket peer, or the last `X-Forwarded-For` hop
//! when the peer is a trusted proxy, so the ip cannot be spoofed.

use std::net::IpAddr;

use ipnet::IpNet;

/// Whether the peer is one of the `trusted_proxies`.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&peer))
}

/// The client ip for rate limiting: the peer, or, when the peer is
/// trusted, the last well-formed hop of `X-Forwarded-For`.
pub fn client_ip(peer: IpAddr, xff: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    xff.and_then(|v| v.rsplit(',').next())
        .and_then(|hop| hop.trim().parse::<IpAddr>().ok())
        .unwrap_or(peer)
}

/// The `X-Forwarded-For` to send upstream: the incoming chain plus the
/// peer when the peer is trusted; otherwise only the peer, since an
/// untrusted client's chain is whatever it chose to write.
pub fn forwarded_for(peer: IpAddr, xff: Option<&str>, trusted: &[IpNet]) -> String {
    match xff {
        Some(chain) if is_trusted(peer, trusted) && !chain.trim().is_empty() => {
            format!("{}, {peer}", chain.trim())
        }
        _ => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let peer: IpAddr = "203.0.113.7".parse().expect("ip");
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(peer, Some("1.2.3.4"), &trusted), peer);
        assert_eq!(
            forwarded_for(peer, Some("1.2.3.4"), &trusted),
            "203.0.113.7"
        );
    }

    #[test]
    fn trusted_peer_passes_the_last_hop() {
        let peer: IpAddr = "10.1.2.3".parse().expect("ip");
        let trusted = nets(&["10.0.0.0/8"]);
        let xff = Some("9.9.9.9, 198.51.100.4");
        assert_eq!(
            client_ip(peer, xff, &trusted),
            "198.51.100.4".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            forwarded_for(peer, xff, &trusted),
            "9.9.9.9, 198.51.100.4, 10.1.2.3"
        );
    }

    #[test]
    fn trusted_peer_with_garbage_falls_back_to_peer() {
        let peer: IpAddr = "10.1.2.3".parse().expect("ip");
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(peer, Some("nonsense"), &trusted), peer);
        assert_eq!(client_ip(peer, None, &trusted), peer);
        assert_eq!(forwarded_for(peer, None, &trusted), "10.1.2.3");
    }
}

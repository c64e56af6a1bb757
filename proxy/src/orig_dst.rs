//! The original destination of a transparently captured connection (`SO_ORIGINAL_DST`),
//! as set by the nftables `redirect` rules of `trellis proxy init`, and whether an inbound
//! one is this pod's own to serve.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// Where the client meant to connect before the redirect, or `None` when the connection
/// was not redirected (the kernel then reports the listener's own address, which the
/// caller detects as a loop).
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let sa = getsockopt(tcp, sockopt::OriginalDst).ok()?;
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(tcp, sockopt::Ip6tOriginalDst).ok()?;
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)))
        }
    }
}

/// Is `dst` an address the inbound may connect to for its caller: one of this host's (pod's)
/// own non-loopback addresses? The kernel redirects whatever reaches the pod, and a caller on
/// its network can address a packet to any IP and route it there: to a foreign IP, the
/// sidecar would connect onward as the proxy's uid (outside capture and egress policy: an open
/// relay); to 127.0.0.1, it would reach services the app keeps to loopback. `local` is the
/// connection's own address (where the redirect delivered it): the pod's address, and in the
/// usual case the destination itself, so the interface list is read only for the rest.
pub fn is_own_address(dst: IpAddr, local: IpAddr) -> bool {
    let dst = dst.to_canonical();
    if dst.is_loopback() || dst.is_unspecified() || dst.is_multicast() {
        return false;
    }
    if dst == local.to_canonical() {
        return true;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return false };
    addrs.filter_map(|a| a.address).any(|a| {
        let ip = a
            .as_sockaddr_in()
            .map(|v4| IpAddr::V4(v4.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())));
        ip.is_some_and(|ip| ip.to_canonical() == dst && !ip.is_loopback())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_hosts_own_non_loopback_addresses_are_served() {
        let pod: IpAddr = "10.94.0.3".parse().unwrap();
        assert!(is_own_address(pod, pod), "the usual case: the pod's own address");
        let mapped: IpAddr = "::ffff:10.94.0.3".parse().unwrap();
        assert!(is_own_address(mapped, pod));
        for refused in ["127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1"] {
            assert!(!is_own_address(refused.parse().unwrap(), pod), "{refused}");
        }
        // A documentation address (RFC 5737) is no interface's here.
        assert!(!is_own_address("192.0.2.77".parse().unwrap(), pod), "a foreign address");
        // An address of one of this machine's interfaces that is not the connection's own.
        let other = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter_map(|a| a.address.and_then(|a| a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip()))))
            .find(|ip| !ip.is_loopback());
        if let Some(other) = other {
            assert!(is_own_address(other, pod), "{other} is this host's");
        }
    }
}

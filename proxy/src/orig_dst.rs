//! The original destination of a transparently captured connection (`SO_ORIGINAL_DST`),
//! as set by the nftables `redirect` rules of `trellis proxy init`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

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

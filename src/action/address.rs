//! Which IP addresses the SSRF guard lets HTTP actions reach.
//!
//! The rule is IANA's: an address is public when the most specific block
//! of the IPv4 or IPv6 special-purpose address registry that contains it
//! says "globally reachable", or when no block contains it. Multicast,
//! IPv6 outside global unicast (`2000::/3`) and IPv6 forms that carry an
//! IPv4 address (mapped, NAT64, 6to4) are handled on top of the registry:
//! the carried IPv4 address is judged instead, so `[64:ff9b::7f00:1]`
//! is loopback. Forms whose IPv4 part cannot be trusted (Teredo, the
//! deprecated IPv4-compatible `::a.b.c.d`, local-use NAT64) are refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One block of a special-purpose registry.
#[derive(Debug, Clone, Copy)]
pub struct Block<A> {
    /// First address of the block.
    pub network: A,
    /// Prefix length.
    pub prefix: u8,
    /// The registry's name for it.
    pub name: &'static str,
    /// Whether actions may reach it.
    pub public: bool,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8, name: &'static str, public: bool) -> Block<Ipv4Addr> {
    Block {
        network: Ipv4Addr::new(a, b, c, d),
        prefix,
        name,
        public,
    }
}

const fn v6(s: [u16; 8], prefix: u8, name: &'static str, public: bool) -> Block<Ipv6Addr> {
    Block {
        network: Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
        name,
        public,
    }
}

/// IANA IPv4 Special-Purpose Address Registry (2024-08), plus multicast.
/// Deprecated blocks count as not reachable.
pub const IPV4_BLOCKS: &[Block<Ipv4Addr>] = &[
    v4(0, 0, 0, 0, 8, "this network", false),
    v4(10, 0, 0, 0, 8, "private use", false),
    v4(
        100,
        64,
        0,
        0,
        10,
        "shared address space (carrier-grade NAT)",
        false,
    ),
    v4(127, 0, 0, 0, 8, "loopback", false),
    v4(169, 254, 0, 0, 16, "link local", false),
    v4(172, 16, 0, 0, 12, "private use", false),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments", false),
    v4(192, 0, 0, 9, 32, "port control protocol anycast", true),
    v4(
        192,
        0,
        0,
        10,
        32,
        "traversal using relays around NAT anycast",
        true,
    ),
    v4(192, 0, 2, 0, 24, "documentation (TEST-NET-1)", false),
    v4(192, 31, 196, 0, 24, "AS112-v4", true),
    v4(192, 52, 193, 0, 24, "automatic multicast tunneling", true),
    v4(192, 88, 99, 0, 24, "deprecated 6to4 relay anycast", false),
    v4(192, 168, 0, 0, 16, "private use", false),
    v4(192, 175, 48, 0, 24, "direct delegation AS112 service", true),
    v4(198, 18, 0, 0, 15, "benchmarking", false),
    v4(198, 51, 100, 0, 24, "documentation (TEST-NET-2)", false),
    v4(203, 0, 113, 0, 24, "documentation (TEST-NET-3)", false),
    v4(224, 0, 0, 0, 4, "multicast", false),
    v4(240, 0, 0, 0, 4, "reserved", false),
    v4(255, 255, 255, 255, 32, "limited broadcast", false),
];

/// IANA IPv6 Special-Purpose Address Registry (2024-08), plus multicast,
/// site-local and the deprecated IPv4-compatible block. The blocks that
/// carry an IPv4 address are listed here as not reachable; [`is_public`]
/// judges the carried address for mapped, NAT64 and 6to4 first.
pub const IPV6_BLOCKS: &[Block<Ipv6Addr>] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified", false),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback", false),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, "deprecated IPv4-compatible", false),
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped", false),
    v6(
        [0x64, 0xff9b, 0, 0, 0, 0, 0, 0],
        96,
        "IPv4/IPv6 translation (NAT64)",
        false,
    ),
    v6(
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "local-use IPv4/IPv6 translation",
        false,
    ),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard only", false),
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy IPv6 prefix", false),
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments",
        false,
    ),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo", false),
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 1],
        128,
        "port control protocol anycast",
        true,
    ),
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 2],
        128,
        "traversal using relays around NAT anycast",
        true,
    ),
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 3],
        128,
        "DNS-SD service registration protocol anycast",
        true,
    ),
    v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, "benchmarking", false),
    v6(
        [0x2001, 3, 0, 0, 0, 0, 0, 0],
        32,
        "automatic multicast tunneling",
        true,
    ),
    v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48, "AS112-v6", true),
    v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, "deprecated ORCHID", false),
    v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, "ORCHIDv2", true),
    v6(
        [0x2001, 0x30, 0, 0, 0, 0, 0, 0],
        28,
        "drone remote ID protocol entity tags",
        true,
    ),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation", false),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4", false),
    v6(
        [0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0],
        48,
        "direct delegation AS112 service",
        true,
    ),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation", false),
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "segment routing SIDs", false),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local", false),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local unicast", false),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "deprecated site-local", false),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast", false),
];

fn most_specific<A: Copy, const N: usize>(
    blocks: &[Block<A>],
    bits: impl Fn(A) -> u128,
    ip: u128,
) -> Option<&Block<A>> {
    blocks
        .iter()
        .filter(|b| {
            let width = u128::MAX >> (128 - N as u32);
            let mask = u128::MAX.checked_shl(N as u32 - u32::from(b.prefix)).unwrap_or(0) & width;
            ip & mask == bits(b.network) & mask
        })
        .max_by_key(|b| b.prefix)
}

/// The registry block that decides about `ip`, if any.
pub fn block_of(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => most_specific::<_, 32>(
            IPV4_BLOCKS,
            |n| u128::from(u32::from(n)),
            u128::from(u32::from(a)),
        )
        .map(|b| b.name),
        IpAddr::V6(a) => most_specific::<_, 128>(IPV6_BLOCKS, u128::from, u128::from(a)).map(|b| b.name),
    }
}

/// The IPv4 address an IPv6 address carries and routes to: IPv4-mapped
/// (`::ffff:a.b.c.d`), well-known NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:AABB:CCDD::`).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    }
}

/// Whether HTTP actions may reach `ip` under `--deny-private-networks`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => most_specific::<_, 32>(
            IPV4_BLOCKS,
            |n| u128::from(u32::from(n)),
            u128::from(u32::from(a)),
        )
        .is_none_or(|b| b.public),
        IpAddr::V6(a) => {
            if let Some(v4) = embedded_ipv4(a) {
                return is_public(IpAddr::V4(v4));
            }
            // Only 2000::/3 is allocated as global unicast.
            let global_unicast = a.segments()[0] & 0xe000 == 0x2000;
            global_unicast
                && most_specific::<_, 128>(IPV6_BLOCKS, u128::from, u128::from(a)).is_none_or(|b| b.public)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each registry entry: its first address, its last address and one
    /// inside are judged as the entry says, unless a more specific entry
    /// decides (then that entry is checked on its own row).
    #[test]
    fn every_registry_entry_is_judged_as_listed() {
        for b in IPV4_BLOCKS {
            let first = u32::from(b.network);
            let last = first | (u32::MAX.checked_shr(u32::from(b.prefix)).unwrap_or(0));
            for probe in [first, last, first + (last - first) / 2] {
                let ip = Ipv4Addr::from(probe);
                let decided_by =
                    most_specific::<_, 32>(IPV4_BLOCKS, |n| u128::from(u32::from(n)), u128::from(probe))
                        .unwrap();
                assert_eq!(
                    is_public(ip.into()),
                    decided_by.public,
                    "{ip} ({})",
                    decided_by.name
                );
                if decided_by.prefix == b.prefix {
                    assert_eq!(is_public(ip.into()), b.public, "{ip} in {}", b.name);
                }
            }
        }
        for b in IPV6_BLOCKS {
            let first = u128::from(b.network);
            let last = first | (u128::MAX.checked_shr(u32::from(b.prefix)).unwrap_or(0));
            for probe in [first, last] {
                let ip = Ipv6Addr::from(probe);
                let decided_by = most_specific::<_, 128>(IPV6_BLOCKS, u128::from, probe).unwrap();
                if embedded_ipv4(ip).is_none() && decided_by.prefix == b.prefix {
                    assert_eq!(is_public(ip.into()), b.public, "{ip} in {}", b.name);
                }
            }
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_by_the_ipv4_address() {
        for private in [
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::7f00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2001::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::127.0.0.1",
            "::8.8.8.8",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn common_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "192.0.0.1",
            "192.0.0.170",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001:db8::1",
            "3fff::1",
            "4000::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "192.0.0.9",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2001:1::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
